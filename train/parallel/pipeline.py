"""Pipeline parallelism (parallel.pp > 1) on `torch.distributed.pipelining`: the single-device LM cut into
stages from outside. One API, the trainer's:

    check_pipeline(layout, cfg, n_microbatches)   the schedule, the stage split and the micro-batches, by key
    Pipeline(model, pp, schedule)                 this rank's stages; the others' blocks go to the meta device
    pipe.modules                                  the stage modules (parallelize wraps them: FSDP roots)
    pipe.owned_view()                             this rank's parameters under the LM's names
    pipe.step(inputs, targets, n_microbatches, device)   forward + backward of a step, tied gradients summed
    pipe.clip_gradients(params, max_norm)         the norm over every stage
    pipe.forward_loss(inputs, targets)            evaluation

Which blocks each stage holds and which rank runs it: train/parallel/pipeline_split.py; the stage modules
and the tied embedding's two copies: train/parallel/pipeline_stages.py; the loss: train/loss.py.

Every rank builds the whole LM (so initialization draws the same random numbers as one process), keeps its
stages' blocks and moves the others to the meta device (no memory). The stage modules hold the model's own
blocks under the LM's names, so `owned_view` presents exactly this rank's parameters under those names: DCP
then writes each stage's tensors from the rank that holds them into one checkpoint that any other layout
(one process included) reads.

Tied embeddings: the last stage's replica of the embedding matrix appears in `owned_view` as
`embed.weight` too. Both copies (and their optimizer states) are identical, so DCP writes the one entry
once, and on load each copy reads it: a checkpoint saved without pipelining fills both.

Gradients: the schedules' default `scale_grads=True` divides by the number of microbatches, so with each
microbatch's mean loss the gradients are those of the loss averaged over the microbatches (equal-size
microbatches: the mean over the whole batch), as on a single device.

Not handled yet: recurrent / KV state is not carried between microbatches or steps (stages run whole
sequences from a zero state), and generation (`LM.step`, models/generate.py) is single-device only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from unroll.models import LM
from unroll.models.config import ModelConfig
from unroll.train.loss import schedule_loss
from unroll.train.parallel.pipeline_split import (  # noqa: F401  check_pipeline: part of this module's API
    check_microbatches,
    check_pipeline,
    schedule_spec,
    stage_layers,
    stage_ranks,
)
from unroll.train.parallel.pipeline_stages import StageModule, build_stage_modules, pp_group, sync_tied_grads


class _OwnedView(nn.Module):
    """A rank's parameters under the LM's names, with the model's config (the checkpoint manifest records the
    architecture)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg


class _Holder(nn.Module):
    """A parameter presented under the name `weight` (the tied replica as `embed.weight`)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class Pipeline:
    """This rank's stages of the LM and the schedule that runs them."""

    def __init__(self, model: LM, pp, schedule: str, *, seq_split: int = 1, hidden_dtype: torch.dtype = torch.float32):
        """pp: the pipeline's process group, a 1-d mesh, or a mesh with a "pp" dimension (None: the world).
        seq_split, hidden_dtype: what crosses a stage boundary, the residual stream [micro-batch, T /
        seq_split, d] (seq_split = tp under sequence parallelism) in hidden_dtype (bf16 when FSDP gathers
        bf16 parameters: the embedding's output, and so the stream, is bf16 then)."""
        schedule_spec(schedule)  # a bad name is reported before any process group is used
        self.model, self.group, self.schedule_name = model, pp_group(pp), schedule
        self.seq_split, self.hidden_dtype = seq_split, hidden_dtype
        self.modules: list[StageModule] = build_stage_modules(model, self.group, schedule)
        self.first = any(m.first for m in self.modules)
        self.last = any(m.last for m in self.modules)
        self.owned = sorted(i for m in self.modules for i in m.layers)
        owned = set(self.owned)
        for i, block in enumerate(model.blocks):
            if i not in owned:
                block.to("meta")  # another pp rank trains it
        if not self.first:
            model.embed.to("meta")
        if not self.last:
            model.norm.to("meta")
            if model.head is not None:
                model.head.to("meta")
        self.schedule: PipelineScheduleSingle | PipelineScheduleMulti | None = None

    def owned_view(self) -> nn.Module:
        """This rank's parameters under the LM's names (call after FSDP has replaced the parameters): the
        module the optimizer and checkpoints see."""
        view = _OwnedView(self.model.cfg)
        if self.first:
            view.embed = self.model.embed
        else:
            replica = next((m.tied_embed_weight for m in self.modules if m.tied_embed_weight is not None), None)
            if replica is not None:
                view.embed = _Holder(replica)
        view.blocks = nn.ModuleDict({str(i): self.model.blocks[i] for i in self.owned})
        if self.last:
            view.norm = self.model.norm
            if self.model.head is not None:
                view.head = self.model.head
        return view

    def step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        n_microbatches: int,
        device: torch.device,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of this rank's batch split into n_microbatches. Returns (sum of the
        microbatch losses on the last stage, zero elsewhere; sum of this rank's stages' MoE losses or None).
        Gradients accumulate into the stage parameters, divided by n_microbatches (the mean). resets [B, T]:
        where documents begin (LM.forward), split into microbatches with the inputs for every stage."""
        if self.schedule is None or self.schedule._n_microbatches != n_microbatches:
            self.schedule = self._schedule(n_microbatches, inputs.shape[0] // n_microbatches, inputs.shape[1], device)
        for m in self.modules:
            m.aux_losses.clear()
        # contiguous, as the stages' static metadata say (a batch's inputs are a strided view of it)
        losses = self._run(
            inputs.contiguous() if self.first else None,
            targets.contiguous(),
            None if resets is None else resets.contiguous(),
        )
        loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
        # each stage ran one forward per microbatch; the first step may add a shape-inference forward first
        aux = [a for m in self.modules for a in m.aux_losses[-n_microbatches:]]
        self._sync_tied_grads()
        return loss_sum, (torch.stack(aux).sum() if aux else None)

    def _schedule(
        self, n_microbatches: int, micro: int, T: int, device: torch.device
    ) -> PipelineScheduleSingle | PipelineScheduleMulti:
        """The schedule running this rank's stages (wrapped by FSDP since they were built), every stage
        given its static metadata: torch then runs no shape-inference forward and backward at the first
        step (time, and a microbatch of activations held beside the real ones)."""
        _, class_name, per_rank, _ = schedule_spec(self.schedule_name)
        cls = getattr(pipelining, class_name)
        check_microbatches(self.schedule_name, n_microbatches, dist.get_world_size(self.group))
        stages = []
        for m in self.modules:
            example_in, example_out = self._metadata(m, micro, T)
            stages.append(
                PipelineStage(
                    m,
                    m.stage_index,
                    m.n_stages,
                    torch.device(device),
                    input_args=example_in,
                    output_args=example_out,
                    group=self.group,
                )
            )
        return cls(stages[0] if per_rank == 1 else stages, n_microbatches=n_microbatches, loss_fn=schedule_loss)

    def _run(
        self, tokens: torch.Tensor | None, targets: torch.Tensor, resets: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """One forward + backward of the batch through the schedule; the microbatch losses on the rank with
        the last stage (empty elsewhere). The targets travel as the keyword argument `targets`, which torch's
        schedules split into microbatches like the inputs and give to every stage's forward on this rank (the
        last one uses them); the schedule's own `target` only feeds its loss_fn, which merely reduces the
        stage's output."""
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.first else ()
        assert self.schedule is not None, "step() builds the schedule first"
        # resets, like the targets, travel as a keyword argument: every stage of this rank gets its microbatch's
        extra: dict[str, Any] = {} if resets is None else {"resets": resets}
        if self.last:
            self.schedule.step(*args, target=targets, losses=losses, targets=targets, **extra)
        else:
            self.schedule.step(*args, **extra)
        return [loss.detach() for loss in losses]

    def _metadata(self, stage: StageModule, micro: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of one microbatch of `stage`, on the meta device: token ids into the first, the
        residual stream between stages, the loss [1] out of the last (float32, or float64 with a float64
        stream)."""
        # requires_grad: a stage receives its output's gradient and sends its input's (torch reads the flag)
        hidden = torch.empty(
            micro,
            T // self.seq_split,
            self.model.cfg.d_model,
            dtype=self.hidden_dtype,
            device="meta",
            requires_grad=True,
        )
        tokens = torch.empty(micro, T, dtype=torch.long, device="meta")
        loss_dtype = torch.promote_types(self.hidden_dtype, torch.float32)
        loss = torch.empty(1, dtype=loss_dtype, device="meta", requires_grad=True)
        return (tokens if stage.first else hidden), (loss if stage.last else hidden)

    def _sync_tied_grads(self) -> None:
        sync_tied_grads(self.modules, self.group)

    @torch.no_grad()
    def forward_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, resets: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Evaluation: the batch's mean loss (computed by the last stage) on the rank with the last stage, None
        elsewhere. Runs the stages in order, sending the hidden state [B, T, d] (T/tp under sequence
        parallelism) point to point (float32, after its shape) between their ranks."""
        order = sorted(self.modules, key=lambda m: m.stage_index)
        mine = {m.stage_index: m for m in order}
        owner = self._owners()
        x = inputs
        for s in range(order[-1].stage_index + 1):
            if s not in mine:
                continue
            if s > 0 and owner[s - 1] != owner[s]:  # its shape first (sequence-parallel stages hold a slice)
                src = dist.get_global_rank(self.group, owner[s - 1])
                shape = torch.empty(3, dtype=torch.int64, device=inputs.device)
                dist.recv(shape, src, self.group)
                x = torch.empty(*shape.tolist(), device=inputs.device)
                dist.recv(x, src, self.group)
            x = mine[s](
                x, targets=targets, resets=resets
            )  # the last stage: the loss, shape [1]; the others ignore targets
            for m in self.modules:
                m.aux_losses.clear()
            if s + 1 < len(owner) and owner[s + 1] != owner[s]:
                dst = dist.get_global_rank(self.group, owner[s + 1])
                dist.send(torch.tensor(x.shape, dtype=torch.int64, device=x.device), dst, self.group)
                dist.send(x.float().contiguous(), dst, self.group)
        return x.squeeze(0) if self.last else None

    def _owners(self) -> list[int]:
        _, _, per_rank, placement = schedule_spec(self.schedule_name)
        size = dist.get_world_size(self.group)
        return stage_ranks(size * per_rank, size, placement)

    def clip_gradients(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's gradient clipping with the norm over every stage: each rank's squares (FSDP shards
        summed by DTensor) added over the pp group; the tied replica is counted once, on the first stage."""
        replicas = {id(m.tied_embed_weight) for m in self.modules if m.tied_embed_weight is not None}
        grads = [p.grad for p in params if p.grad is not None and id(p) not in replicas]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        sq = norm.double() ** 2
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt().to(norm.dtype)
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
        return total
