"""The training loss, one definition for plain and pipelined runs.

A step minimises the mean, over its micro-batches, of each micro-batch's mean next-token cross-entropy plus
the MoE layers' balancing losses (aux and z-loss, models/moe.py). Plain runs compute the cross-entropy in
the model's forward (`lm_loss`, through the DDP / FSDP wrapper) and start the backward from
`micro_batch_objective` divided by the micro-batches (`micro_batch_backward`). Pipelined runs
(train/parallel/pipeline.py) compute the same pieces inside the stages: the last stage's cross-entropy
(`hidden_loss`), each stage's balancing losses joined to its output's backward (`with_moe_loss`), and
torch's schedules divide the gradients by the number of micro-batches (their scale_grads). Either way the
cross-entropy is chunked (kernels/cross_entropy.py): the [B, T, V] logits are never held whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unroll.kernels.cross_entropy import chunked_cross_entropy


@dataclass
class TokenBatch:
    """Windows of seq_len + 1 tokens [B, T+1] and, for isolated documents, where documents begin in them
    (bool [B, T+1], data/loader.py `get_with_starts`; None: each row one stream)."""

    tokens: torch.Tensor
    starts: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def to(self, device: torch.device | str) -> TokenBatch:
        """On `device`; from page-locked memory (a prefetched batch on CUDA) the copy is asynchronous: the step's
        kernels are queued behind it on the same stream, and torch keeps the pinned block alive until it is done."""

        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=t.is_pinned())

        return TokenBatch(moved(self.tokens), None if self.starts is None else moved(self.starts))


def _context_slice(x: torch.Tensor, cp_rank: int, cp: int) -> torch.Tensor:
    T = x.shape[1] // cp
    return x[:, cp_rank * T : (cp_rank + 1) * T] if cp > 1 else x


def split_batch(batch: torch.Tensor | TokenBatch, cp_rank: int = 0, cp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch [B, T+1] that holds the inputs and the targets shifted by one; under
    context parallelism this rank's slice of the T positions."""
    tokens = batch.tokens if isinstance(batch, TokenBatch) else batch
    return _context_slice(tokens[:, :-1], cp_rank, cp), _context_slice(tokens[:, 1:], cp_rank, cp)


def split_resets(batch: torch.Tensor | TokenBatch, cp_rank: int = 0, cp: int = 1) -> torch.Tensor | None:
    """The model's resets [B, T] of the inputs split_batch gives (True where a document begins at input t),
    or None for rows that are one stream each."""
    if not isinstance(batch, TokenBatch) or batch.starts is None:
        return None
    return _context_slice(batch.starts[:, :-1], cp_rank, cp)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor | TokenBatch, cp_rank: int = 0, cp: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy over this rank's slice of the batch (the mean of the cp ranks'
    losses is the whole sequence's), computed by the model without full logits (LM.forward's targets)."""
    inputs, targets = split_batch(batch, cp_rank, cp)
    return model(inputs, targets=targets, resets=split_resets(batch, cp_rank, cp))


def hidden_loss(
    normed: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, group=None
) -> torch.Tensor:
    """The mean cross-entropy of the logits normed @ weightᵀ (normed [B, T, d]: the final norm's output;
    weight [V, d], or this rank's vocabulary rows under tensor parallelism with its `group`) against
    targets [B, T], `chunk` tokens of logits at a time, as LM.forward computes it with targets."""
    return chunked_cross_entropy(normed.flatten(0, 1), weight, targets.flatten(), chunk=chunk, group=group)


def micro_batch_objective(loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """What a micro-batch's backward starts from: its cross-entropy plus its MoE balancing losses."""
    return loss if aux is None else loss + aux


def micro_batch_backward(loss: torch.Tensor, aux: torch.Tensor | None, n_micro_batches: int) -> None:
    """The backward of one of a step's micro-batches: gradients accumulate to the mean objective."""
    (micro_batch_objective(loss, aux) / n_micro_batches).backward()


class _BackwardAlso(torch.autograd.Function):
    """Identity on a stage's output x; its backward also starts the backward of `aux` (a scalar loss
    computed inside the stage) with gradient 1, as if aux had been added to the final loss: a pipeline
    schedule only backpropagates from the stage outputs."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()  # not a view: the zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=g.device)


def with_moe_loss(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """A pipeline stage's output x whose backward also adds the stage's MoE balancing losses `aux` to the
    objective (`micro_batch_objective` spread over the stages that hold MoE layers)."""
    return _BackwardAlso.apply(x, aux)


def schedule_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A pipeline schedule's loss_fn: the last stage's output already is its micro-batch's mean
    cross-entropy (shape [1], from `hidden_loss`; the stage took the targets as a keyword argument); this
    only makes it a scalar."""
    return output.sum()
