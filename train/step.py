"""One optimizer step of one rank (`train_step`): the forwards and backwards of its micro-batches, plain or
pipelined, the expert gradients averaged, the gradients clipped, the step judged by the guard
(train/step_guard.py) and applied or dropped on every rank alike, and the MoE experts' biases moved."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from unroll.models import LM
from unroll.train import loss as training_loss  # lm_loss looked up per call: a test hook may replace it
from unroll.train.build import Training
from unroll.train.config import Config
from unroll.train.loss import TokenBatch, micro_batch_backward, split_batch, split_resets
from unroll.train.optim import clip_gradients
from unroll.train.parallel import distributed as D
from unroll.train.parallel.expert_parallel import average_expert_grads, expert_mesh, expert_parameters
from unroll.train.parallel.mesh import Layout
from unroll.train.parallel.parallelize import gradient_sync
from unroll.train.step_guard import StepGuard, Verdict


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's microbatch losses summed (zero on a pipeline's non-last stages)
    aux_sum: torch.Tensor  # its MoE balancing losses summed
    grad_norm: torch.Tensor | None
    counts: torch.Tensor | None  # MoE assignments of the step, [MoE layers, experts], summed over ranks
    loss: float | None = None  # with a guard: the step's mean loss over every rank, and its MoE balancing loss
    aux: float | None = None
    grad_norm_value: float | None = None  # with a guard: the global norm, as judged
    verdict: Verdict | None = None  # with a guard: why the step was not applied; None when it was


def train_step(
    t: Training,
    cfg: Config,
    batches: Callable[[int, int], torch.Tensor | TokenBatch],
    first: int,
    lr: float,
    device: torch.device,
    guard: StepGuard | None = None,
) -> StepResult:
    """One optimizer step on this rank's samples first ... first + micro·accum − 1; batches(start, n) gives
    n sequences of seq_len + 1 tokens from sample `start` on. With a guard the step is judged before the
    optimizer (train/step_guard.py) on the loss all-reduced over the ranks and the global gradient norm, so
    that every rank applies it, or none does."""
    model, layout, ranks, micro, accum = t.model, t.layout, t.ranks, t.micro, t.accum
    if t.engine is not None:  # parallel.engine=deepspeed
        from unroll.train.deepspeed_engine import deepspeed_step

        return deepspeed_step(t, cfg, batches, step_reads(first, micro, accum, pipelined=False), lr, device, guard)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    reads = step_reads(first, micro, accum, pipelined=t.pipe is not None)
    if t.pipe is not None:  # the schedule runs the accum microbatches through the stages
        batch = batches(*reads[0]).to(device)
        inputs, targets = split_batch(batch, ranks["cp"], layout.cp)
        with t.autocast:
            loss_sum, aux = t.pipe.step(inputs, targets, accum, device, split_resets(batch, ranks["cp"], layout.cp))
        if aux is not None:
            aux_sum += aux
    else:
        for i, read in enumerate(reads):
            batch = batches(*read).to(device)
            with gradient_sync(t.trained, i == accum - 1), t.autocast:
                loss = training_loss.lm_loss(t.trained, batch, ranks["cp"], layout.cp)
                aux = model.aux_loss()  # MoE balancing losses of this forward (None without MoE)
            micro_batch_backward(loss, aux, accum)
            loss_sum += loss.detach()
            if aux is not None:
                aux_sum += aux.detach()
    if layout.ep > 1:  # sums over the ep group's tokens → FSDP's mean over the data ranks
        assert t.mesh is not None, "ep > 1 runs on a mesh"
        replicas = t.mesh["dp"].size() // layout.ep
        average_expert_grads(
            model, expert_mesh(expert_parameters(model)[0][1])["edp"].get_group() if replicas > 1 else None, layout.dp
        )
    # the guard needs the norm also without clipping: an infinite bound leaves the gradients as they are
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    if cfg.optim.grad_clip <= 0 and guard is None:
        grad_norm = None
    elif t.pipe is not None:
        grad_norm = t.pipe.clip_gradients(list(t.owned.parameters()), max_norm)
    else:
        grad_norm = clip_gradients(model, max_norm)
    result = StepResult(loss_sum, aux_sum, grad_norm, None)
    if guard is not None:
        judge_step(result, layout, accum, guard)
    if result.verdict is None:
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        result.counts = update_expert_bias(model, device)
    else:  # nothing of this step reaches the weights, the optimizer state or the experts' biases
        t.optimizer.zero_grad(set_to_none=True)
        for _, moe in model.moe_layers():
            moe.load_since_update.zero_()
    return result


def step_reads(first: int, micro: int, accum: int, pipelined: bool) -> list[tuple[int, int]]:
    """The reads (start, count) of `train_step`'s batches, in order, for a step of this rank from sample `first`:
    the trainer's prefetch plan follows them."""
    return [(first, micro * accum)] if pipelined else [(first + i * micro, micro) for i in range(accum)]


def judge_step(result: StepResult, layout: Layout, accum: int, guard: StepGuard) -> None:
    """Fills result.loss, .aux and .verdict from one all-reduce: every rank adds its mean over its
    microbatches (under pipelining only the last stage holds the loss, and the stages' MoE losses add up to
    the model's) and a flag for a gradient norm that is not finite where this rank computed it."""
    assert result.grad_norm is not None, "with a guard the step computes the gradient norm"
    norm = result.grad_norm.full_tensor() if isinstance(result.grad_norm, DTensor) else result.grad_norm
    means = torch.stack([result.loss_sum, result.aux_sum]).float() / accum
    stats = torch.cat([means, (~torch.isfinite(norm)).float().reshape(1)])
    D.all_reduce_sum(stats)
    contributors = (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1) // layout.pp
    loss_sum, aux_sum, bad_norm, norm_value = torch.cat([stats, norm.float().reshape(1)]).tolist()
    result.loss, result.aux = loss_sum / contributors, aux_sum / contributors
    result.grad_norm_value = math.nan if bad_norm else norm_value
    result.verdict = guard.judge(result.loss, result.grad_norm_value)


def update_expert_bias(model: LM, device: torch.device) -> torch.Tensor | None:
    """After an optimizer step: every MoE layer's assignment counts since the last step, summed over the
    data-parallel ranks, move its auxiliary-loss-free expert bias (identically on every rank). Returns
    the counts [MoE layers, experts] for the load metrics."""
    layers = model.moe_layers()
    if not layers:
        return None
    # under pipelining another stage's layers sit on the meta device here: they count zero, their owners
    # contribute the counts, and only the owners' biases matter
    here = [moe for _, moe in layers if moe.expert_bias.device.type != "meta"]
    counts = torch.stack(
        [
            moe.load_since_update.to(device)
            if moe in here
            else torch.zeros(moe.n_experts, dtype=torch.long, device=device)
            for _, moe in layers
        ]
    ).double()
    D.all_reduce_sum(counts)
    for (_, moe), c in zip(layers, counts):
        if moe in here:
            moe.update_bias(c)
    return counts
