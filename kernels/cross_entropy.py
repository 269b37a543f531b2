"""The language-model loss without the full logits: cross-entropy computed chunk by chunk over the tokens, and
vocabulary-parallel (Megatron-style) when the output matrix is split over the ranks of a group.

    chunked_cross_entropy(hidden [N, d], weight [V_local, d], targets [N], *, chunk, group=None) -> mean loss
    cross_entropy_reference(hidden, weight, targets)      the oracle: F.cross_entropy on full logits
    gather_vocab(logits_local [..., V_local], group)      full logits [..., V] from the vocabulary shards

The math. With logits z_i = W h_i (one row per vocabulary entry) and target y_i,

    loss = (1/N) Σ_i [ log Σ_v exp(z_iv) − z_{i,y_i} ]        ∂loss/∂z_iv = (softmax(z_i)_v − [v = y_i]) / N

and ∂/∂h_i = Σ_v ∂loss/∂z_iv W_v, ∂/∂W_v = Σ_i ∂loss/∂z_iv h_i. Nothing needs all N × V logits at
once: the tokens are cut into chunks of `chunk` rows, each chunk's loss is summed, and the sum divided by N.
The logits matmul runs in the ambient dtype (bfloat16 under autocast), the softmax and the loss in float32
(float64 inputs stay float64: the tests' oracle).

Memory. Each chunk runs under torch.utils.checkpoint (non-reentrant): the forward keeps only its inputs
(views of `hidden`, and `weight`), and the backward recomputes the chunk's logits just before their
gradient, so forward and backward hold O(chunk × V_local) at a time, at the price of one more logits matmul.
Checkpointing rather than a hand-written Function over all chunks: the matmul's backward stays autograd's own
(autocast casts, FSDP's mixed-precision parameters, the zero-bubble schedules' split of the backward into
input and weight parts all work as for any other layer), and with one chunk (chunk <= 0 or chunk >= N) it
is the plain computation, nothing recomputed.

Vocabulary parallelism (`group`): rank r of the group holds rows [r·V_local, (r+1)·V_local) of W, so its
logits are the columns z_i[r·V_local : (r+1)·V_local]. The row maximum m_i and the sum of exp(z_iv − m_i) are
all-reduced over the group (max, then sum), the target logit is taken by the rank that owns y_i (zero
elsewhere) and all-reduced, and every rank gets the same loss log Σ exp(z_iv − m_i) − (z_{i,y_i} − m_i). The gradient of its logits, softmax_local −
onehot_local, is complete; its gradient with respect to `hidden`, Σ over its own rows, is PARTIAL: the
caller must sum it over the group (train/parallel/tensor_parallel/vocab.py does, where the final norm's output is made
whole). Two all-reduces per chunk (the max; the sum of exponentials stacked with the target logit), of one
or two vectors of the chunk's length; inside a checkpointed chunk they run again in the backward's
recompute, on every rank alike. Written on plain tensors and torch.distributed, not torch's loss_parallel
context manager: the backward runs inside pipeline schedules and checkpoint recomputation, which a context
manager around the forward does not reach.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Group = dist.ProcessGroup | None  # None: the default group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss [n] from this rank's logit columns [n, V_local] (float32), the vocabulary split over
    `group` in rank order. backward: (softmax_local − onehot_local) · g, from the saved softmax."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
        n, rows = logits.shape
        start = dist.get_rank(group) * rows
        row_max = logits.max(dim=-1).values  # any shift gives the same softmax; the global max avoids overflow
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local = targets - start
        mine = (local >= 0) & (local < rows)  # the target's column is on this rank
        local = torch.where(mine, local, 0)
        target_logit = shifted.gather(1, local.unsqueeze(-1)).squeeze(-1) * mine
        exp = shifted.exp_()  # in place: `shifted` is ours and no longer needed
        sum_exp = exp.sum(dim=-1)
        # one all-reduce for both sums
        sums = torch.stack([sum_exp, target_logit])
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, mine = ctx.saved_tensors
        # a new tensor, not the saved softmax modified in place: a backward may run twice on this graph
        # (retain_graph, the zero-bubble schedules' separate input and weight passes)
        g = softmax * grad.unsqueeze(-1)
        g.scatter_add_(1, local.unsqueeze(-1), -(grad * mine).unsqueeze(-1).to(g.dtype))
        return g, None, None


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
    """Σ over the chunk's tokens of the cross-entropy: logits in the ambient dtype, the loss in float32."""
    logits = _at_least_float32(F.linear(hidden, weight))
    if group is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    # torch leaves Function.apply unannotated
    per_token: torch.Tensor = _VocabParallelCrossEntropy.apply(logits, targets, group)  # type: ignore[no-untyped-call]
    return per_token.sum()


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int, group: Group = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T against `targets`, chunk by chunk.

    hidden [N, d], weight [V_local, d], targets [N] int64 → a float32 scalar (float64 for float64 inputs).
    chunk: tokens per logits chunk (chunk <= 0 or chunk >= N: all at once, no recompute).
    group: the process group the vocabulary is split over (weight holds rows [r·V_local, (r+1)·V_local) on
    rank r); every rank then returns the same loss, the gradient of `weight` is complete for the rows this
    rank holds, and the gradient with respect to `hidden` is this rank's part of a sum over the group that
    the caller must complete (see the module docstring)."""
    N = hidden.shape[0]
    if hidden.ndim != 2 or weight.ndim != 2 or targets.shape != (N,) or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}; expected [N, d], [V, d], [N]"
        )
    if chunk <= 0 or chunk >= N:
        return _chunk_loss_sum(hidden, weight, targets, group) / N
    total: torch.Tensor | None = None
    for h, t in zip(torch.split(hidden, chunk), torch.split(targets, chunk)):  # N > chunk ≥ 1: at least two chunks
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss_sum, h, weight, t, group, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_loss_sum(h, weight, t, group)
        total = part if total is None else total + part
    assert total is not None
    return total / N


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The oracle: the full [N, V] logits and F.cross_entropy (mean), one process."""
    return F.cross_entropy(_at_least_float32(hidden @ weight.T), targets)


class _GatherVocab(torch.autograd.Function):
    """all_gather along the last dimension; the backward keeps this rank's columns of the gradient (every rank
    computed the same thing from the same full logits, so each holds the whole gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None


def gather_vocab(logits: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., V_local] on each rank of `group` (rank r: vocabulary rows r·V_local ...) → [..., V] on every rank,
    differentiably. As in the loss, the gradient reaching the hidden states is partial per rank."""
    out: torch.Tensor = _GatherVocab.apply(logits, group)  # type: ignore[no-untyped-call]  # torch: apply unannotated
    return out
