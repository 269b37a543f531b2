"""`unroll plan`: per-GPU memory of a config under the parallel layouts the trainer runs, from the accounting
the code itself does, and the layouts that fit.

Per GPU, for the rank holding the first shard of every split (the largest share; rank 0), bytes:

  weights      every parameter this rank holds × 4 (fp32 master weights). Which parts: the model built on
               the meta device and tensor parallelism applied by its own plans (train/parallel/tensor_parallel/;
               what tp keeps whole, e.g. M²RNN's input projection at qk_heads=1, counts whole); the blocks
               of this rank's pipeline stages (train/parallel/pipeline_split.py stage_layers, the embedding on the first,
               the final norm, head or tied replica on the last); E/ep routed experts (expert parallelism,
               which FSDP leaves alone); FSDP's split of the rest over dp_shard × cp on the dimension
               fsdp_shard_placement picks, rank 0's chunk (rounded up). Plus the buffers.
  gradients    × 4 (fp32: FSDP reduce-scatters in fp32)
  optimizer    AdamW's two moments, × 8, plus a 4-byte step per tensor
  gathered     FSDP2's unsharded copies, in the parameter dtype p (2 with bf16 mixed precision, else 4):
               the root's (embedding, final norm, head) all step long, and its gradient from the loss's backward
               on; in a block's backward the block, its unsharded gradient and the next block's all-gather
               (FSDP's prefetch), all p, and the reduce-scatter input (4): root·2p + largest block·(3p + 4)
               (on real ranks, whose collectives are asynchronous, FSDP at times has one more all-gather in
               flight: up to a block·p more);
               on the rank with the loss, its gradient of the hidden states (tokens × d × 4) too.
               Pipelined, torch's schedules keep every block of a stage unsharded, with its unsharded
               gradient, for the whole step: stage·(2p + 4) + root·p. Or, if larger, the embedding's
               backward on the rank that has it: root·p + E·g·p + first block·2p, E the embedding and g
               its gradients being summed (tied: 3, the output matrix's, which waited through the blocks'
               backward, the lookup's and their sum; else 1); pipelined, beside the stage held unsharded.
               Without FSDP, a tied embedding's gradients at that moment, E·5·4 (the output matrix's, its
               fp32 copy, the lookup's, their sum, the parameter's); under DDP also its buckets, a copy of
               the gradients (parameters · 4).
  activations  per layer kind, what the real block keeps per token for the backward (train/planning/activation_probe.py:
               measured once on the block at full width, under this tp, ep and activation checkpointing) × the
               stage's layers, plus the largest kind's extra at its own peak (Newton's working memory, the
               backward's gradients, a recomputed block), × tokens per micro-batch on this rank (micro-batch
               × sequence / cp); a pipeline stage holds up to `in flight` micro-batches. fp32 weights
               under bf16 autocast (no FSDP) add a part per block that does not grow with the tokens
               (autocast's bf16 copy of the block's weights), fitted from probes at two lengths
  logits       one chunk of min(tokens, train.loss_chunk) × V/tp logits, and a temporary of the output
               matrix's size, at the bytes per logit and per matrix element the loss itself measures
               (kernels/cross_entropy.py on a small vocabulary, train/planning/activation_probe.py)

Under parallel.engine=deepspeed (train/deepspeed_engine.py: ZeRO over all ranks, fp32 parameters, bf16 autocast)
the static parts follow ZeRO's stage instead, P the parameters, P/dp their share of a rank (`_zero_static`):
  weights      stage 1, 2: P × 4, whole on every rank; stage 3: P/dp × 4 (none with deepspeed.offload_params)
  gradients    stage 1: P × 4; stage 2, 3: P/dp × 4 (on the CPU with an offloaded optimizer)
  optimizer    the fp32 master copy and AdamW's moments, P/dp × 12 (off the GPU with deepspeed.offload_optimizer)
  gathered     stage 3: the root and the largest block gathered, with the next block's prefetch and the block's
               whole gradient before its reduce-scatter, root·4 + block·12; stage 1, 2: the reduce bucket
  offloaded    what the offloads put in CPU memory or on NVMe instead, per rank: not part of the GPU total

Not counted: the CUDA context, NCCL buffers and the allocator's fragmentation (keep a margin: `usable`).
`unroll rehearse` runs the same rank's program and prints these figures beside what it measured.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field, replace

import torch
from torch.distributed.tensor import DTensor

from unroll.models.config import ModelConfig
from unroll.train.config import Config, ConfigError
from unroll.train.parallel.mesh import Layout, not_yet
from unroll.train.parallel.pipeline_split import schedule_spec, stage_layers, stage_ranks
from unroll.train.planning.activation_probe import logit_bytes, probe
from unroll.train.planning.memory import Components

GiB = 1024**3
EXPERTS = ("w_gate_up", "w_down")


@dataclass(frozen=True)
class Param:
    """One parameter (or buffer) of the model as tensor parallelism leaves it on a tp rank."""

    name: str
    block: int | None  # its block, None for the embedding, final norm and head
    expert: bool  # a routed expert's weights (expert parallelism splits them)
    shape: tuple[int, ...]  # the whole tensor
    local: tuple[int, ...]  # after tensor parallelism
    strided: frozenset[int]  # dimensions tp strides (FSDP shards another)
    buffer: bool = False

    def numel(self) -> int:
        n = 1
        for s in self.local:
            n *= s
        return n


_TABLES: dict[tuple, list[Param]] = {}


def param_table(cfg: ModelConfig, tp: int) -> list[Param]:
    """Every parameter and buffer with its tp-local shape: the model built on the meta device and tp applied
    by train/parallel/tensor_parallel/ (in a fake process group of tp ranks; nothing is allocated)."""
    key = (repr(cfg), tp)
    if key in _TABLES:
        return _TABLES[key]
    from torch.distributed.tensor.placement_types import _StridedShard

    from unroll.models import LM

    group: contextlib.AbstractContextManager = contextlib.nullcontext()
    if tp > 1:
        from unroll.train.planning.fake_comm import fake_process_group

        group = fake_process_group(0, tp)
    with group:
        with torch.device("meta"):
            model = LM(cfg)
        if tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from unroll.train.parallel.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))["tp"])
        table = []
        for buffer, named in ((False, model.named_parameters()), (True, model.named_buffers())):
            for name, p in named:
                parts = name.split(".")
                block = int(parts[1]) if parts[0] == "blocks" else None
                local = tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
                strided = frozenset(pl.dim for pl in getattr(p, "placements", ()) if isinstance(pl, _StridedShard))
                table.append(
                    Param(name, block, parts[-1] in EXPERTS and ".mlp." in name, tuple(p.shape), local, strided, buffer)
                )
    _TABLES[key] = table
    return table


def _fsdp_share(p: Param, dp: int) -> int:
    """Elements of p on FSDP's rank 0 over dp ranks, on the dimension the trainer shards it (the tp-local
    extent of that dimension split in dp chunks, the first rounded up)."""
    from types import SimpleNamespace

    from torch.distributed.tensor.placement_types import _StridedShard

    from unroll.train.parallel.tensor_parallel.placement import fsdp_shard_placement

    shaped = SimpleNamespace(
        shape=torch.Size(p.shape),
        ndim=len(p.shape),
        placements=tuple(_StridedShard(d, split_factor=2) for d in p.strided),
    )
    placement = fsdp_shard_placement(dp)(shaped)
    if placement is None:
        return p.numel()
    d = placement.dim
    return p.numel() // p.local[d] * -(-p.local[d] // dp) if p.local[d] else 0


@dataclass
class Estimate:
    layout: Layout
    components: Components
    params_held: int  # elements of the parameters this rank holds
    stage_layers: int  # blocks on this rank
    in_flight: float  # micro-batches whose activations this rank's stages hold at once
    offloaded: dict[str, float] = field(default_factory=dict)  # DeepSpeed: bytes per rank in "cpu" / "nvme"

    @property
    def total(self) -> float:
        return self.components.total


def _uses_fsdp(layout: Layout) -> bool:
    from unroll.train.parallel.parallelize import uses_fsdp as uses

    return uses(layout, layout.pp > 1)


def _stage_of_rank0(cfg: Config, layout: Layout) -> tuple[set[int], bool, bool, float]:
    """(blocks, holds the first stage, holds the last, micro-batches in flight) of pipeline rank 0."""
    if layout.pp == 1:
        return set(range(len(cfg.model.layers))), True, True, 1
    name, _, per_rank, placement = schedule_spec(cfg.parallel.pp_schedule)
    n = layout.pp * per_rank
    layers = stage_layers(cfg.model, n)
    mine = [s for s, r in enumerate(stage_ranks(n, layout.pp, placement)) if r == 0]
    blocks = {b for s in mine for b in layers[s]}
    _, accum = _micro_accum(cfg, layout)
    return blocks, 0 in mine, n - 1 in mine, in_flight(name, layout.pp, per_rank, accum)


def in_flight(schedule: str, pp: int, per_rank: int, microbatches: int) -> float:
    """Micro-batches whose activations pipeline rank 0 holds at once, in units of all its stages' blocks:
    GPipe and LoopedBFS run every forward before any backward; 1F1B warms up with pp − 1 forwards and
    holds one more; the interleaved and zero-bubble schedules warm up with (pp − 1)·2 + (stages per rank −
    1)·pp forwards of one local stage each (torch's own count), one more in flight."""
    if schedule in ("GPipe", "LoopedBFS"):
        return microbatches
    if per_rank == 1:
        return min(microbatches, pp)
    units = (pp - 1) * 2 + (per_rank - 1) * pp + 1  # local-stage forwards, each 1/per_rank of the blocks
    return min(units / per_rank, microbatches)


def _micro_accum(cfg: Config, layout: Layout) -> tuple[int, int]:
    from unroll.train.preflight import micro_batches

    try:
        return micro_batches(cfg, layout)  # as the trainer splits the batch (pipelining's default too)
    except ConfigError:
        pass  # a layout the trainer refuses: _runs leaves it out; estimate() still reads a figure
    per_rank = max(cfg.train.batch_size // layout.dp, 1)
    micro = cfg.train.micro_batch_size or per_rank
    return micro, max(per_rank // micro, 1)


def estimate(
    cfg: Config,
    layout: Layout,
    *,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    bf16: bool | None = None,
    budget: float | None = None,
) -> Estimate:
    """Components of rank 0 of `layout` (module docstring), at the config's sequence length and micro-batch
    unless given. bf16: the job's precision (default: run.dtype auto or bfloat16, as on a GPU). budget: bytes
    beyond which the layout is of no interest: when weights, gradients, optimizer and gathered copies
    exceed it alone, activations and logits are not probed (left 0)."""
    model = cfg.model
    seq = seq_len or cfg.data.seq_len
    micro = micro_batch or _micro_accum(cfg, layout)[0]
    bf16 = cfg.run.dtype in ("auto", "bfloat16") if bf16 is None else bf16
    table = param_table(model, layout.tp)
    blocks, first, last, flight = _stage_of_rank0(cfg, layout)
    fsdp = _uses_fsdp(layout)
    dp = layout.dp_shard * layout.cp
    p_bytes = 2 if (fsdp and bf16) else 4

    held = buffers = tensors = 0
    block_size: dict[int, int] = {}  # FSDP-managed elements per block (tp-local), for the gathered copies
    root = 0
    for p in table:
        if p.block is not None and p.block not in blocks:
            continue
        if p.block is None and not (first if p.name.startswith("embed") else last):
            continue
        if p.buffer:
            buffers += p.numel() * 4
            continue
        tensors += 1
        if p.expert and layout.ep > 1:
            held += p.numel() // layout.ep
            continue
        held += _fsdp_share(p, dp) if fsdp else p.numel()
        if p.block is None:
            root += p.numel()
        else:
            block_size[p.block] = block_size.get(p.block, 0) + p.numel()
    if layout.pp > 1 and model.tie_embeddings and last and not first:  # the last stage's tied replica
        replica = next(p for p in table if p.name == "embed.weight")
        held += _fsdp_share(replica, dp) if fsdp else replica.numel()
        root += replica.numel()
        tensors += 1

    embed = next(p for p in table if p.name == "embed.weight").numel()  # this rank's slice under tp
    tied_here = model.tie_embeddings and first and last
    gathered = 0.0
    ddp = not fsdp and layout.dp * layout.cp > 1
    if not fsdp and tied_here:
        # the embedding's gradient being summed at the end of the backward, in the parameters' fp32: the
        # output matrix's (which waited through the blocks'), its fp32 copy, the lookup's, their sum (and
        # the parameter's, which under DDP its bucket, counted below, stands in for)
        gathered = embed * 4 * (4 if ddp else 5)
    if fsdp:
        block = max(block_size.values(), default=0)
        if layout.pp > 1:  # every block of the stage unsharded, with its gradient, the whole step
            beside = sum(block_size.values()) * (2 * p_bytes + 4)
            gathered = beside + root * p_bytes
        else:
            # in a block's backward: the root and its gradient (the loss's backward made it), the block, its
            # gradient and reduce-scatter input, and the next block's all-gather (FSDP's prefetch; on real
            # ranks, whose collectives are asynchronous, one more at times: see `unroll rehearse`)
            beside = block_size.get(0, 0) * 2 * p_bytes
            gathered = root * 2 * p_bytes + block * (3 * p_bytes + 4)
        if first:  # the embedding's backward, if larger
            gathered = max(gathered, root * p_bytes + embed * (3 if tied_here else 1) * p_bytes + beside)
    if ddp:  # DDP's buckets: a copy of the gradients, for the all-reduce
        gathered += held * 4
    tokens = micro * seq // layout.cp
    if last:  # the loss's gradient of the hidden states waits with the output matrix's
        gathered += tokens * model.d_model * 4

    static = Components(
        weights=held * 4 + buffers, gradients=held * 4, optimizer=held * 8 + tensors * 4, gathered=gathered
    )
    offloaded: dict[str, float] = {}
    if cfg.parallel.engine == "deepspeed":
        fsdp = False  # ZeRO's parameters are fp32 under autocast, as without FSDP
        static, held, offloaded = _zero_static(cfg, layout, table, buffers, tokens)
    if budget is not None and static.total > budget:
        return Estimate(layout, static, held, len(blocks), flight, offloaded)
    costs = probe(
        model, layout.tp, fsdp and bf16, bf16, seq // layout.cp, cfg.train.activation_checkpoint, micro, ep=layout.ep
    )
    mine = [(k, m) for i, (k, m) in enumerate(zip(model.layers, model.mlp_kinds)) if i in blocks]
    kept = sum(costs[k].saved for k in mine) * tokens  # per micro-batch in flight
    fixed = sum(costs[k].saved_fixed for k in mine)  # autocast's bf16 copies of fp32 weights, once
    activations = (
        kept * flight + fixed + max((costs[k].extra * tokens + costs[k].extra_fixed for k in mine), default=0.0)
    )
    chunk = cfg.train.loss_chunk or tokens
    rows = min(tokens, chunk)
    per_logit, per_weight = logit_bytes(bf16, fsdp and bf16, layout.tp, tokens > rows)
    logits = model.vocab_size / layout.tp * (rows * per_logit + model.d_model * per_weight) if last else 0.0

    return Estimate(
        layout, replace(static, activations=activations, logits=logits), held, len(blocks), flight, offloaded
    )


def _zero_static(
    cfg: Config, layout: Layout, table: list[Param], buffers: int, tokens: int
) -> tuple[Components, int, dict[str, float]]:
    """(weights, gradients, optimizer and gathered bytes on the GPU, parameters held, bytes offloaded by place)
    of a rank under DeepSpeed's ZeRO (module docstring)."""
    ds = cfg.deepspeed
    params = [p for p in table if not p.buffer]
    total = sum(p.numel() for p in params)
    share = -(-total // layout.dp)
    offloaded: dict[str, float] = {}

    def put(place: str, nbytes: float) -> float:
        """nbytes on `place`: 0 on the GPU when it is offloaded there."""
        if place == "none":
            return nbytes
        offloaded[place] = offloaded.get(place, 0.0) + nbytes
        return 0.0

    held = total if ds.zero_stage < 3 else share
    weights = put(ds.offload_params, held * 4) + buffers
    if ds.zero_stage == 1:
        gradients = total * 4.0
    elif ds.offload_optimizer != "none":  # ZeRO-Offload keeps the fp32 gradient partitions in CPU memory
        gradients = put("cpu", share * 4)
    else:
        gradients = share * 4.0
    optimizer = put(ds.offload_optimizer, share * 12)
    if ds.zero_stage == 3:
        blocks: dict[int, int] = {}
        for p in params:
            if p.block is not None:
                blocks[p.block] = blocks.get(p.block, 0) + p.numel()
        root = sum(p.numel() for p in params if p.block is None)
        gathered = root * 4 + max(blocks.values(), default=0) * 12
    else:
        from unroll.train.deepspeed_engine import BUCKET  # ZeRO's reduce bucket, as the engine sets it

        gathered = min(total, BUCKET) * 4
    gathered += tokens * cfg.model.d_model * 4  # the loss's gradient of the hidden states
    return Components(weights=weights, gradients=gradients, optimizer=optimizer, gathered=gathered), held, offloaded


def estimate_for(rehearsal) -> Estimate:
    """The plan's figures for a rehearsal's config and layout (rank 0), at the configured length."""
    return estimate(rehearsal.config, rehearsal.layout, seq_len=rehearsal.target_seq)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: ModelConfig, world: int, gpus_per_node: int):
    """Every (pp, tp, cp, ep, dp_shard) on `world` GPUs the model's shapes allow and the trainer runs
    (train/parallel/mesh.py's not_yet), tp within a node."""
    kinds = set(cfg.layers)
    for tp, pp, cp in itertools.product(_divisors(gpus_per_node), _divisors(world), (1, 2, 4, 8)):
        if world % (tp * pp * cp) or pp > len(cfg.layers):
            continue
        if tp > 1 and (
            "A" in kinds
            and (cfg.n_heads % tp or cfg.kv_heads % tp)
            or "M" in kinds
            and cfg.m2rnn_v_heads % tp
            or kinds & {"G", "L"}
            and cfg.rnn_dim % tp
            or cfg.vocab_size % tp  # the embedding and head are split over the vocabulary
            or "T" in kinds
        ):  # TNT has no tensor-parallel plan yet
            continue
        shard = world // (tp * pp * cp)
        eps = (
            [e for e in _divisors(shard * cp) if e <= cfg.moe.experts and cfg.moe.experts % e == 0]
            if "E" in cfg.mlp_kinds
            else [1]
        )
        for ep in eps:
            layout = {"pp": pp, "dp_replicate": 1, "dp_shard": shard, "cp": cp, "tp": tp, "ep": ep}
            if not not_yet(Layout(**layout)):  # only what the trainer can run
                yield layout


def _cost(layout: Layout) -> tuple:
    """Preference among fitting layouts: less model parallelism first (each costs communication or
    bubbles), tp before pp before cp; more expert parallelism is cheap (it shrinks expert memory)."""
    return (layout.tp * layout.pp * layout.cp, layout.pp, layout.cp, layout.tp, -layout.ep)


def _runs(cfg: Config, layout: Layout) -> bool:
    """What the trainer would refuse for this config (sequence or batch splits, pipeline micro-batches)."""
    from unroll.train.preflight import check_shape

    try:
        check_shape(cfg, layout)
    except (ConfigError, ValueError):
        return False
    return True


def plan(cfg: Config, *, nodes: int, gpus_per_node: int, gpu_gib: float = 80.0, usable: float = 0.9) -> list[Estimate]:
    """The layouts that run and fit `usable` of each GPU's memory, best first."""
    fits = []
    layouts = list(candidate_layouts(cfg.model, nodes * gpus_per_node, gpus_per_node))
    if cfg.parallel.engine == "deepspeed":  # data parallelism only: ZeRO over every rank
        layouts = [{"dp_shard": nodes * gpus_per_node}]
    for lay in layouts:
        layout = Layout(**lay)
        if not _runs(cfg, layout):
            continue
        e = estimate(cfg, layout, budget=usable * gpu_gib * GiB)
        if e.total <= usable * gpu_gib * GiB:
            fits.append(e)
    return sorted(fits, key=lambda e: _cost(e.layout))


def format_estimate(e: Estimate) -> str:
    lay = " ".join(f"{k}={getattr(e.layout, k)}" for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep"))
    parts = ", ".join(f"{name} {value / GiB:.1f}" for name, value in e.components.as_dict().items())
    off = "".join(f"; offloaded to {place} {value / GiB:.1f}" for place, value in e.offloaded.items())
    return f"{lay}: {e.total / GiB:.1f} GiB per GPU ({parts}; {e.params_held / 1e6:,.0f}M parameters held{off})"
