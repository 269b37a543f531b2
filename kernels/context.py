"""Context parallelism's exchanges: the sequence is split over the ranks of a group (rank r holds the r-th
contiguous slice), and layers that look back across the split get what they need, differentiably.

    gather_sequence(x, group, dim)   every rank's slice, concatenated (attention's keys and values)
    gather_flags(flags, group)       every rank's bool [B, T_local] flags, concatenated (where documents start)
    sequence_mean(x, group)          a mean over the slice's tokens → over the whole sequence's (MoE balancing)
    previous_tail(tail, first, group) the previous rank's tail (a convolution's last inputs); rank 0 gets `first`
    receive_state(first, group, anchor)  the state handed on by the previous rank (rank 0: `first`)
    send_state(h, group)             hands h to the next rank; returns a zero scalar to add to the layer's
                                     output, so that the backward reaches it and receives the gradient of h
                                     from the next rank

The state hand-off is a pipeline: rank r computes after rank r − 1, and in the backward before it. The
collectives (all_gather, whose backward is a reduce_scatter) need every rank of the group; the
point-to-point hand-offs pair each rank with its neighbours only. Tested on gloo (CPU); NCCL not yet run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None  # None: the default group


def _rank(group: Group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group: Group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


class _GatherSequence(torch.autograd.Function):
    """all_gather along `dim` forward, reduce_scatter of the gradient backward. Written out rather than
    torch.distributed.nn's all_gather: on gloo its backward (an all_to_all of the gradient's slices) gave
    wrong key/value gradients for attention here, silently (tests/test_context.py fails with it; the
    slices of a gradient cut along a middle dimension are strided, the likely cause)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        R = dist.get_world_size(group)
        local = x.movedim(dim, 0).contiguous()
        out = local.new_empty(R * local.shape[0], *local.shape[1:])
        dist.all_gather_single(out, local, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        full = grad.movedim(ctx.dim, 0).contiguous()
        mine = full.new_empty(full.shape[0] // dist.get_world_size(ctx.group), *full.shape[1:])
        dist.reduce_scatter_single(mine, full, group=ctx.group)
        return mine.movedim(0, ctx.dim), None, None


def gather_sequence(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """[..., T_local, ...] on every rank → [..., R·T_local, ...] in rank order; gradients flow back to
    each slice's owner (summed over the ranks that used it)."""
    out: torch.Tensor = _GatherSequence.apply(x, group, dim)  # type: ignore[no-untyped-call]  # torch: apply unannotated
    return out


def gather_flags(flags: torch.Tensor, group: Group) -> torch.Tensor:
    """Every rank's bool [B, T_local], joined in rank order into [B, R·T_local] (as uint8: gloo has no bool
    collectives); not differentiable (flags are data)."""
    parts = [torch.empty_like(flags, dtype=torch.uint8) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flags.to(torch.uint8).contiguous(), group=group)
    return torch.cat(parts, dim=1).bool()


class _SequenceMean(torch.autograd.Function):
    """The mean over the group's ranks, forward; backward the same mean of the gradients. Every cp rank's
    loss then holds the whole sequence's statistic once, and data parallelism's gradient average over the
    cp ranks gives its exact gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out / dist.get_world_size(group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out / dist.get_world_size(ctx.group), None


def sequence_mean(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A per-slice mean (e.g. MoE routing probabilities averaged over the tokens) → the whole sequence's,
    given equal slices."""
    out: torch.Tensor = _SequenceMean.apply(x, group)  # type: ignore[no-untyped-call]  # torch: apply unannotated
    return out


def previous_tail(tail: torch.Tensor, first: torch.Tensor, group: Group) -> torch.Tensor:
    """The previous rank's `tail` (same shape everywhere); rank 0 gets `first`. One all_gather."""
    r, _ = _rank(group)
    gathered = gather_sequence(tail.unsqueeze(0), group, 0)
    if r == 0:  # the gathered tensor enters the graph (times 0) so that rank 0 joins the backward's collective too
        return first + 0 * gathered[0]
    return gathered[r - 1]


class _Receive(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, first: torch.Tensor, group: Group) -> torch.Tensor:
        r, _ = _rank(group)
        ctx.group, ctx.r = group, r
        if r == 0:
            return first.clone()
        buf = torch.empty_like(first)
        dist.recv(buf, src=_global(group, r - 1), group=group)
        return buf

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.r == 0:
            return grad, None
        dist.send(grad.contiguous(), dst=_global(ctx.group, ctx.r - 1), group=ctx.group)
        return torch.zeros_like(grad), None


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, group: Group) -> torch.Tensor:
        r, R = _rank(group)
        ctx.group, ctx.r, ctx.R = group, r, R
        ctx.meta = (h.shape, h.dtype, h.device)
        if r < R - 1:
            dist.send(h.detach().contiguous(), dst=_global(group, r + 1), group=group)
        return h.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor, None]:
        shape, dtype, device = ctx.meta
        grad = torch.zeros(shape, dtype=dtype, device=device)
        if ctx.r < ctx.R - 1:
            dist.recv(grad, src=_global(ctx.group, ctx.r + 1), group=ctx.group)
        return grad, None


def receive_state(first: torch.Tensor, group: Group, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """`anchor`, a tensor computed from the layer's input, ties the hand-off into the graph between that
    input and the output (it contributes 0), so a backward that only asks for the input's gradient — a
    pipeline schedule's `autograd.grad(outputs, inputs)` — still runs _Receive and sends the gradient back."""
    if torch.is_grad_enabled() and anchor is not None and anchor.requires_grad:
        first = first + 0 * anchor.reshape(-1)[:1].sum().to(first.dtype)
    elif torch.is_grad_enabled() and not first.requires_grad:
        # The output must require grad so that the backward reaches _Receive and sends the gradient
        # back to the previous rank, even where the initial state itself is a constant.
        first = first.detach().requires_grad_()
    out: torch.Tensor = _Receive.apply(first, group)  # type: ignore[no-untyped-call]  # torch: apply unannotated
    return out


def send_state(h: torch.Tensor, group: Group) -> torch.Tensor:
    """A zero scalar, after handing h to the next rank (see the module docstring)."""
    out: torch.Tensor = _Send.apply(h, group)  # type: ignore[no-untyped-call]  # torch: apply unannotated
    return out
