"""The linear recurrence h_t = a_t h_{t−1} + b_t over a sequence, in O(T) work.

Shapes (the state is a D-vector, or D independent k-vectors):
    diagonal:        a, b: [B, T, D]                     h0: [B, D]      -> h: [B, T, D]
    block-diagonal:  a: [B, T, D, k, k], b: [B, T, D, k]  h0: [B, D, k]   -> h: [B, T, D, k]
reverse=True runs from the end: h_t = a_t h_{t+1} + b_t, with h0 the state after the last step.
resets: bool [B, T]; where True the a_t term is dropped (h_{t−1}, or h_{t+1} in reverse, treated as 0),
which starts a new document inside a packed row.

The plain-PyTorch path is chunked: a sequential scan inside chunks of C ≈ √T steps, vectorised over all
chunks, then a sequential pass over the T/C chunk summaries, then one vectorised fix-up. That is O(T)
work (O(T k³) for blocks) in 2√T Python steps. The backward is the same scan run the other way with
transposed coefficients (the adjoint), so autograd stores nothing per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# A forward-scan kernel: impl(a, b, h0, block) -> h (scan_reference, triton_scan.scan_triton).
ScanImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _chunk_size(T: int) -> int:
    return max(1, min(256, 1 << round(math.log2(max(1.0, math.sqrt(T))))))


def apply_step(a: torch.Tensor, h: torch.Tensor, block: bool) -> torch.Tensor:
    """a·h for one step of the recurrence: elementwise (diagonal, block=False) or a batched k×k
    matrix-vector product (block=True; a [..., k, k], h [..., k])."""
    return (a @ h.unsqueeze(-1)).squeeze(-1) if block else a * h


def compose_steps(a2: torch.Tensor, a1: torch.Tensor, block: bool) -> torch.Tensor:
    """The transfer of step 1 then step 2, a2·a1: elementwise (diagonal) or a batched k×k matrix product."""
    return a2 @ a1 if block else a2 * a1


def scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: bool) -> torch.Tensor:
    """Forward scan, chunked, no autograd bookkeeping of its own (callers wrap it)."""
    B, T = b.shape[:2]
    C = _chunk_size(T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # zero steps at the end: their outputs are dropped and nothing follows them
        a = torch.cat([a, a.new_zeros(B, pad, *a.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, *b.shape[2:])], dim=1)
    a = a.reshape(B, N, C, *a.shape[2:])
    b = b.reshape(B, N, C, *b.shape[2:])
    local = torch.empty_like(b)  # the scan inside each chunk, from a zero state
    transfer = torch.empty_like(a)  # a_i ··· a_0 within the chunk: how the chunk's entry state reaches step i
    h, A = b[:, :, 0], a[:, :, 0]
    local[:, :, 0], transfer[:, :, 0] = h, A
    for i in range(1, C):
        h = apply_step(a[:, :, i], h, block) + b[:, :, i]
        A = compose_steps(a[:, :, i], A, block)
        local[:, :, i], transfer[:, :, i] = h, A
    entry = torch.empty_like(b[:, :, 0])  # the state entering each chunk
    state = h0
    for n in range(N):
        entry[:, n] = state
        state = apply_step(transfer[:, n, -1], state, block) + local[:, n, -1]
    out = local + apply_step(transfer, entry.unsqueeze(2).expand_as(local), block)
    return out.reshape(B, N * C, *b.shape[3:])[:, :T]


def _shift_back(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[first, x_0, ..., x_{T−2}] along dim 1."""
    return torch.cat([first.unsqueeze(1), x[:, :-1]], dim=1)


def _transpose(a: torch.Tensor, block: bool) -> torch.Tensor:
    return a.transpose(-1, -2) if block else a


class _ForwardScan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: bool, impl: ScanImpl
    ) -> torch.Tensor:
        h = impl(a, b, h0, block)
        ctx.block, ctx.impl = block, impl
        ctx.save_for_backward(a, h0, h)
        return h

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        a, h0, h = ctx.saved_tensors
        block, impl = ctx.block, ctx.impl
        # λ_t = g_t + a_{t+1}ᵀ λ_{t+1}: the same scan, backwards in time, with transposed coefficients.
        a_next = torch.cat([_transpose(a[:, 1:], block), torch.zeros_like(a[:, :1])], dim=1)
        lam = impl(a_next.flip(1), g.contiguous().flip(1), torch.zeros_like(h0), block).flip(1)
        h_prev = _shift_back(h, h0)
        grad_a = lam.unsqueeze(-1) * h_prev.unsqueeze(-2) if block else lam * h_prev
        grad_h0 = apply_step(_transpose(a[:, 0], block), lam[:, 0], block)
        return grad_a, lam, grad_h0, None, None


def _check(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, resets: torch.Tensor | None) -> bool:
    if b.dim() == 3 and a.shape == b.shape:
        block = False
    elif b.dim() == 4 and a.dim() == 5 and a.shape[:-1] == b.shape and a.shape[-1] == b.shape[-1]:
        block = True
    else:
        raise ValueError(
            f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} are neither diagonal "
            "([B, T, D] both) nor block-diagonal ([B, T, D, k, k] and [B, T, D, k])"
        )
    if h0 is not None and (h0.shape[0] != b.shape[0] or h0.shape[1:] != b.shape[2:]):
        raise ValueError(f"linear_scan: h0 {tuple(h0.shape)} does not match the state {tuple(b.shape[2:])}")
    if resets is not None and resets.shape != b.shape[:2]:
        raise ValueError(f"linear_scan: resets {tuple(resets.shape)} is not [B, T] = {tuple(b.shape[:2])}")
    return block


def mask_resets(a: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """a with the steps that start a new document zeroed (their h_{t−1} term dropped)."""
    if resets is None:
        return a
    shape = resets.shape + (1,) * (a.dim() - 2)
    return torch.where(resets.view(shape), torch.zeros((), dtype=a.dtype, device=a.device), a)


def default_impl(t: torch.Tensor) -> ScanImpl:
    """The Triton scan for CUDA tensors (triton imported only then), the PyTorch reference otherwise."""
    if t.device.type != "cuda":
        return scan_reference
    from unroll.kernels.triton_scan import scan_triton

    return scan_triton


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    resets: torch.Tensor | None = None,
    impl: ScanImpl | None = None,
) -> torch.Tensor:
    """h_t = a_t h_{t−1} + b_t (see the module docstring for shapes); differentiable in a, b and h0.

    impl(a, b, h0, block) -> h is the forward-scan kernel: by default the Triton kernels on CUDA
    (kernels/triton_scan.py) and `scan_reference` elsewhere; either may be passed explicitly.
    """
    block = _check(a, b, h0, resets)
    if b.shape[1] == 0:
        return b.clone()
    if h0 is None:
        h0 = b.new_zeros(b.shape[0], *b.shape[2:])
    a = mask_resets(a, resets)
    impl = impl or default_impl(b)
    if reverse:
        a, b = a.flip(1), b.flip(1)
    h: torch.Tensor = _ForwardScan.apply(a, b, h0, block, impl)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
    return h.flip(1) if reverse else h
