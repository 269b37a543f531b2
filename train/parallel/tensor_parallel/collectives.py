"""The autograd collectives of tensor parallelism that DTensor's redistribute does not give: sums over the tp
group whose backward sums the gradient too."""

from __future__ import annotations

import torch
import torch.distributed as dist


def summed(t: torch.Tensor, group) -> torch.Tensor:
    """The sum of `t` over the group, in a fresh contiguous tensor (one copy; gloo needs contiguous data
    and the input may be a view autograd still holds)."""
    t = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(t, group=group)
    return t


class AllReduceGrad(torch.autograd.Function):
    """Identity; the backward sums the gradient over the group (a weight every rank used for its part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return summed(g, ctx.group), None


class AllReduce(torch.autograd.Function):
    """Sum over the group; the backward sums the gradient too (each rank's use of the sum is partial)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return summed(x, group)

    @staticmethod
    def backward(ctx, g):
        return summed(g, ctx.group), None
