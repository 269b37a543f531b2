"""Pipeline parallelism on `torch.distributed.pipelining`: the single-device LM cut into stages from outside.

    stage_layers(cfg, stages)                 which block indices each stage holds
    build_stage_module(model, layers, ...)    one stage as a module holding the model's own blocks
    build_schedule(model, pp, name, n_mb)     -> (schedule, stage modules of this rank)
    pipeline_step(schedule, modules, tokens, targets) -> mean loss over microbatches (last-stage ranks)
    sync_tied_grads(modules, pp)              after the step, before clipping / the optimizer, tied models only

Stage boundaries come from the pattern's `|` marks ("GA|LG": stage 0 holds blocks 0-1, stage 1 blocks 2-3)
when the marks give exactly the number of stages the schedule needs; a pattern without marks is balanced
automatically by parameter count (the embedding counted on the first stage, the head on the last).

Placement (which rank runs which stage, ranks counted within the pp group of size P):
    GPipe, 1F1B                                    one stage per rank: rank r runs stage r
    Interleaved1F1B, LoopedBFS, InterleavedZeroBubble  two per rank, looped: r and r + P
    ZBVZeroBubble, DualPipeV                       two per rank, V: r and 2P - 1 - r (so rank 0 runs
                                                   both the first and the last stage)

The loss: the last stage computes it itself from its hidden states (`StageModule.forward(x, targets)`, the
chunked cross-entropy of kernels/cross_entropy.py, as `LM.forward(tokens, targets=...)` does), so the head is
used inside the stage's forward (where FSDP has gathered it) and the full logits are never held; the targets
reach it as a keyword argument of `schedule.step`, and the schedule's loss_fn only reduces that output.

Tied embeddings: the last stage computes logits with the embedding matrix that the first stage looks tokens
up in. The last stage gets its own replica of it (the parameter `tied_embed_weight`, a copy of
`model.embed.weight` at build time), on every placement, even when both stages are on one rank (a shared
Parameter object would be divided twice by the schedule's per-stage `scale_grads`). `sync_tied_grads` then
sets the gradient of both copies to their sum (point to point between the two ranks, or locally under V
placement), which is the single-device gradient of the tied weight; identical gradients and identical
optimizer updates keep the copies equal. Consequences for the caller: the replica has optimizer state of its
own (identical to the embedding's); a global gradient norm for clipping must count the tied weight once
(skip `tied_embed_weight`); checkpoints should save `embed.weight` only and, on load, copy it into the
replica (`copy_tied_weight`).

Gradients: the schedules' default `scale_grads=True` divides by the number of microbatches, so with each
microbatch's mean loss the gradients are those of the loss averaged over the microbatches (equal-size
microbatches: the mean over the whole batch), as on a single device.

MoE balancing losses (aux and z-loss) computed inside a stage join the backward at that stage's output
(`_BackwardAlso`), so pipelined gradients equal single-device training on loss + aux.

Not handled yet:
- Recurrent / KV state: stages run whole sequences from a zero state (`state=None`); no state is carried
  between microbatches or steps, and generation (`LM.step`, models/generate.py) is single-device only.
- Shapes are inferred at the first step; a later step with other microbatch shapes (e.g. a smaller eval
  batch) needs a new schedule.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from unroll.kernels.cross_entropy import chunked_cross_entropy, gather_vocab
from unroll.models.config import ModelConfig
from unroll.models.lm import LM, Block
from unroll.models.moe import MoE, balancing_loss

# name: (schedule class, stages per rank, placement)
SCHEDULES = {
    "GPipe": (ScheduleGPipe, 1, "loop"),
    "1F1B": (Schedule1F1B, 1, "loop"),
    "Interleaved1F1B": (ScheduleInterleaved1F1B, 2, "loop"),
    "LoopedBFS": (ScheduleLoopedBFS, 2, "loop"),
    "InterleavedZeroBubble": (ScheduleInterleavedZeroBubble, 2, "loop"),
    "ZBVZeroBubble": (ScheduleZBVZeroBubble, 2, "v"),
    "DualPipeV": (ScheduleDualPipeV, 2, "v"),
}


def schedule_spec(name: str) -> tuple[str, type, int, str]:
    """(canonical name, class, stages per rank, placement) of a schedule name, case-insensitive."""
    for key, spec in SCHEDULES.items():
        if key.lower() == name.lower():
            return (key,) + spec
    raise ValueError(f"unknown pipeline schedule {name!r}; choices: {', '.join(SCHEDULES)}")


def stage_ranks(n_stages: int, pp: int, placement: str) -> list[int]:
    """The pp-group rank that runs each stage."""
    if placement == "v":
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]


def _marked_stages(pattern: str) -> list[list[int]]:
    out, layer = [[]], 0
    for c in pattern:
        if c == "|":
            out.append([])
        else:
            out[-1].append(layer)
            layer += 1
    return out


def layer_costs(cfg: ModelConfig) -> tuple[list[int], int, int]:
    """Parameter count of each block, of the embedding and of the head (the last stage's logits matrix,
    counted also when tied), from a meta-device build: no memory, no initialization cost."""
    with torch.device("meta"):
        blocks = [
            sum(p.numel() for p in Block(kind, cfg, mlp).parameters()) for kind, mlp in zip(cfg.layers, cfg.mlp_kinds)
        ]
    embed = cfg.vocab_size * cfg.d_model
    head = cfg.vocab_size * cfg.d_model + cfg.d_model  # + the final norm
    return blocks, embed, head


def balance(costs: list[int], stages: int, first: int = 0, last: int = 0) -> list[list[int]]:
    """Contiguous split of `costs` into `stages` non-empty parts minimizing the largest part's cost (`first`
    added to the first part, `last` to the last); ties go to the split with the earliest cut points."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i, j, s):  # layers i..j-1 as stage s
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == stages - 1 else 0)

    INF = float("inf")
    # best[s][j]: the smallest max cost of layers 0..j-1 in stages 0..s; cut[s][j]: where stage s starts
    best = [[INF] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], cost(i, j, s))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(stages - 1, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    bounds.append((0, j))
    return [list(range(i, j)) for i, j in reversed(bounds)]


def stage_layers(cfg: ModelConfig, stages: int) -> list[list[int]]:
    """The block indices each of `stages` pipeline stages holds: the pattern's `|` marks when it has any (they
    must give exactly `stages` stages, none empty), else a contiguous split balanced by parameter count."""
    n = len(cfg.layers)
    if stages < 1:
        raise ValueError(f"pipeline stages must be positive, got {stages}")
    if stages > n:
        raise ValueError(
            f"{stages} pipeline stages for {n} layers (pattern {cfg.pattern!r}): every stage needs at least one layer"
        )
    marks = cfg.pattern.count("|")
    if marks:
        if marks + 1 != stages:
            raise ValueError(
                f"pattern {cfg.pattern!r} has {marks} stage mark(s) '|', i.e. {marks + 1} stages, "
                f"but the pipeline needs {stages} (pp × stages per rank); move the marks or "
                f"remove them all for an automatic split"
            )
        split = _marked_stages(cfg.pattern)
        empty = [s for s, layers in enumerate(split) if not layers]
        if empty:
            raise ValueError(
                f"pattern {cfg.pattern!r}: stage(s) {empty} have no layers (a '|' at an end or two in a row)"
            )
        return split
    blocks, embed, head = layer_costs(cfg)
    return balance(blocks, stages, embed, head)


class _BackwardAlso(torch.autograd.Function):
    """Identity on the stage's output x; its backward also starts the backward of `aux` (a scalar loss
    computed inside the stage, e.g. MoE balancing) with gradient 1, as if aux had been added to the final
    loss: the schedule only backpropagates from the stage outputs. The schedule's division of all gradients
    by the number of microbatches then gives mean(loss + aux) over microbatches, as on one device."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()  # not a view: the zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=g.device)


class StageModule(nn.Module):
    """One pipeline stage: the embedding on the first, the LM's own Block objects for `layers` (under their
    LM names, `blocks.<i>`), the final norm and head on the last. forward: tokens or hidden → hidden, or on
    the last stage the loss (given targets) or logits."""

    def __init__(self, model: LM, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.layers, self.first, self.last = list(layers), first, last
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.tied = model.head is None
        self.tied_embed_weight = None  # one stage (first and last) uses embed.weight itself
        if last and self.tied and not first:
            self.tied_embed_weight = nn.Parameter(model.embed.weight.detach().clone())
        self.tied_peer: int | None = None  # pp-group rank holding the other copy of the tied weight
        self.lm_rules = model.init_rules()  # the embedding's and head's initialisation (models/init.py)
        # the loss as the LM computes it (models/lm.py): tokens per logits chunk; the vocabulary's process
        # group under tensor parallelism (set by train/parallel/tensor_parallel/vocab.py)
        self.loss_chunk, self.vocab_group = model.loss_chunk, model.vocab_group
        self.aux_losses: list[torch.Tensor] = []  # this stage's MoE losses, one per microbatch (for logging)

    def init_rules(self) -> dict:
        """The LM's own rules; the tied replica draws the embedding's numbers, so it starts equal to it."""
        rules = dict(self.lm_rules)
        if self.tied_embed_weight is not None:
            rules["tied_embed_weight"] = replace(rules["embed.weight"], key="embed.weight")
        return rules

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE balancing losses of this stage's blocks in the last forward (None without MoE layers)."""
        return balancing_loss([b.mlp for b in self.blocks.values() if isinstance(b.mlp, MoE)])

    def output_weight(self) -> torch.Tensor:
        """The last stage's [V, d] logits matrix: the head's, or (tied) the replica or the embedding itself."""
        if self.head is not None:
            return self.head.weight
        return self.tied_embed_weight if self.tied_embed_weight is not None else self.embed.weight

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (first stage) or hidden [B, T, d] → hidden [B, T, d]; on the last stage logits [B, T, V], or
        with targets [B, T] the mean cross-entropy as a tensor of shape [1] (the schedules merge the last
        stage's outputs along dim 0). Other stages ignore targets: the schedule gives a rank's keyword
        arguments to each of its stages."""
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x, _ = block(x)
        aux = self.aux_loss()
        if aux is not None:
            self.aux_losses.append(aux.detach())
            if torch.is_grad_enabled():
                x = _BackwardAlso.apply(x, aux)
        if not self.last:
            return x
        x = self.norm(x)
        if targets is None:
            logits = F.linear(x, self.output_weight())
            return logits if self.vocab_group is None else gather_vocab(logits, self.vocab_group)
        # the head is used here, inside the stage's forward, where FSDP has gathered it
        loss = chunked_cross_entropy(
            x.flatten(0, 1), self.output_weight(), targets.flatten(), chunk=self.loss_chunk, group=self.vocab_group
        )
        return torch.stack([loss])  # not a view: the schedules detach the last stage's outputs in place

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding matrix (None if it holds none or the model is untied)."""
        if not self.tied or self.first == self.last:
            return None
        return self.embed.weight if self.first else self.tied_embed_weight


def build_stage_module(model: LM, layers: list[int], first: bool, last: bool) -> StageModule:
    """A module running blocks `layers` of `model` (the same objects, not copies), with the embedding when
    `first` and the final norm and head when `last`; tied embeddings get a replica on the last stage (see the
    module docstring)."""
    return StageModule(model, layers, first, last)


def _pp_group(pp) -> dist.ProcessGroup:
    if isinstance(pp, DeviceMesh):
        if pp.ndim == 1:
            return pp.get_group()
        if pp.mesh_dim_names and "pp" in pp.mesh_dim_names:
            return pp["pp"].get_group()
        raise ValueError(f"a {pp.ndim}-d mesh without a 'pp' dimension: pass the pp sub-mesh or its group")
    return pp if pp is not None else dist.group.WORLD


def build_stage_modules(model: LM, pp, schedule: str) -> list[StageModule]:
    """This rank's stage modules, in stage order, for `schedule` over the pipeline group `pp` (a process
    group, a 1-d mesh, or a mesh with a "pp" dimension). Each has `stage_index`, `n_stages` and
    `tied_peer` set. They hold the model's own blocks, embedding, norm and head: wrap them (FSDP) before
    `schedule_for`."""
    _, _, per_rank, placement = schedule_spec(schedule)
    group = _pp_group(pp)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    n_stages = size * per_rank
    layers = stage_layers(model.cfg, n_stages)
    owner = stage_ranks(n_stages, size, placement)
    modules = []
    for s in range(n_stages):
        if owner[s] != rank:
            continue
        m = build_stage_module(model, layers[s], s == 0, s == n_stages - 1)
        m.stage_index, m.n_stages = s, n_stages
        m.tied_peer = owner[n_stages - 1] if s == 0 else owner[0]
        modules.append(m)
    return modules


def check_microbatches(schedule: str, n_microbatches: int, pp_size: int) -> None:
    """What the schedule needs of the number of microbatches per step (torch checks only at the first step)."""
    name, _, per_rank, _ = schedule_spec(schedule)
    n_stages = pp_size * per_rank
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be positive, got {n_microbatches}")
    if name in ("1F1B", "DualPipeV") and n_microbatches < n_stages:
        raise ValueError(f"{name} needs at least as many microbatches as stages ({n_stages}), got {n_microbatches}")
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and n_microbatches % pp_size:
        raise ValueError(f"{name} needs n_microbatches divisible by the pp size {pp_size}, got {n_microbatches}")


def last_stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedules' loss_fn: the last stage's output already is its microbatch's mean loss (shape [1], see
    StageModule.forward, which took the targets as a keyword argument); this only makes it a scalar."""
    return output.sum()


def schedule_for(
    modules: list[StageModule], pp, schedule: str, n_microbatches: int, device: torch.device | str, metadata=None
) -> object:
    """The schedule running `modules` (from `build_stage_modules`, possibly wrapped by FSDP since).
    metadata(module) -> (example input, example output), meta tensors of one microbatch, when the caller
    knows them: with every stage's given, torch runs no shape-inference forward and backward at the first
    step (time, and a microbatch of activations held beside the real ones); without, it infers them."""
    _, cls, per_rank, _ = schedule_spec(schedule)
    group = _pp_group(pp)
    check_microbatches(schedule, n_microbatches, dist.get_world_size(group))
    stages = []
    for m in modules:
        example_in, example_out = metadata(m) if metadata is not None else (None, None)
        stages.append(
            PipelineStage(
                m,
                m.stage_index,
                m.n_stages,
                torch.device(device),
                input_args=example_in,
                output_args=example_out,
                group=group,
            )
        )
    if per_rank == 1:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=last_stage_loss)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=last_stage_loss)


def build_schedule(
    model: LM, pp, schedule: str, n_microbatches: int, device: torch.device | str | None = None
) -> tuple[object, list[StageModule]]:
    """This rank's part of the pipeline: (the schedule object, its stage modules in stage order).

    `pp` is the pipeline process group, a 1-d mesh, or a mesh with a "pp" dimension. The loss is the model's
    own (the last stage computes each microbatch's mean cross-entropy, `model.loss_chunk` tokens of logits at
    a time; the schedule divides the gradients by n_microbatches). The stage modules hold the model's own
    blocks, embedding, norm and head, so an optimizer over the modules' parameters trains the model in place
    (plus, for tied embeddings, the replica `tied_embed_weight`, which is not among `model.parameters()`).
    Every rank still holds the whole `model`; the blocks of other ranks' stages are simply unused here (the
    trainer moves them to the meta device)."""
    schedule_spec(schedule)  # a bad name is reported before any process group is used
    check_microbatches(schedule, n_microbatches, dist.get_world_size(_pp_group(pp)))
    modules = build_stage_modules(model, pp, schedule)
    if device is None:
        device = next(model.parameters()).device
    return schedule_for(modules, pp, schedule, n_microbatches, device), modules


def run_schedule(
    schedule, modules: list[StageModule], tokens: torch.Tensor | None, targets: torch.Tensor | None
) -> list[torch.Tensor]:
    """One forward + backward of the batch through `schedule`; the microbatch losses on the rank with the last
    stage (empty elsewhere). The targets travel as the keyword argument `targets`, which torch's schedules
    split into microbatches like the inputs and give to every stage's forward on this rank (the last one
    uses them); the schedule's own `target` only feeds its loss_fn, which merely reduces the stage's output."""
    losses: list[torch.Tensor] = []
    args = (tokens,) if any(m.first for m in modules) else ()
    if any(m.last for m in modules):
        schedule.step(*args, target=targets, losses=losses, targets=targets)
    else:
        schedule.step(*args)
    return [loss.detach() for loss in losses]


def pipeline_step(
    schedule, modules: list[StageModule], tokens: torch.Tensor | None = None, targets: torch.Tensor | None = None
) -> torch.Tensor | None:
    """One forward + backward of the batch (split along dim 0 into the schedule's microbatches): tokens are
    used where the first stage is, targets where the last is. Returns the mean of the microbatch losses on
    the rank with the last stage, None elsewhere. Gradients accumulate into the stage modules' parameters;
    call `sync_tied_grads` next for a tied model."""
    losses = run_schedule(schedule, modules, tokens, targets)
    return torch.stack(losses).mean() if losses else None


def sync_tied_grads(modules: list[StageModule], pp) -> None:
    """Sum the gradients of the two copies of a tied embedding matrix (first stage's `embed.weight`, last
    stage's `tied_embed_weight`) into both, point to point between their ranks. Every pp rank may call it;
    ranks holding neither copy do nothing. A no-op for untied models."""
    group = _pp_group(pp)
    mine = [(m, m.tied_weight()) for m in modules]
    mine = [(m, w) for m, w in mine if w is not None]
    if not mine:
        return
    for _, w in mine:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
    if len(mine) == 2:  # V placement: both copies here
        total = mine[0][1].grad + mine[1][1].grad
        for _, w in mine:
            w.grad.copy_(total)
        return
    m, w = mine[0]
    # under FSDP both copies are sharded alike over the data-parallel ranks: peers swap their local shards
    grad = w.grad.to_local() if isinstance(w.grad, DTensor) else w.grad
    other = torch.empty_like(grad)
    peer = dist.get_global_rank(group, m.tied_peer)
    ops = [dist.P2POp(dist.isend, grad.contiguous(), peer, group), dist.P2POp(dist.irecv, other, peer, group)]
    if not m.first:
        ops.reverse()
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    grad.add_(other)


@torch.no_grad()
def copy_tied_weight(modules: list[StageModule], pp) -> None:
    """Make the last stage's replica of a tied embedding equal the first stage's `embed.weight` (after
    loading a checkpoint into the model): sent from the first stage's rank. Every pp rank may call it."""
    group = _pp_group(pp)
    own = dist.get_rank(group)
    for m in modules:
        w = m.tied_weight()
        if w is None or m.tied_peer == own:
            continue
        peer = dist.get_global_rank(group, m.tied_peer)
        if m.first:
            dist.send(w.detach().contiguous(), peer, group)
        else:
            buf = torch.empty_like(w)
            dist.recv(buf, peer, group)
            w.copy_(buf)
    # V placement: both copies on one rank
    pair = [(m, m.tied_weight()) for m in modules if m.tied_weight() is not None]
    if len(pair) == 2:
        src = next(w for m, w in pair if m.first)
        dst = next(w for m, w in pair if m.last)
        dst.copy_(src)
