"""The linear recurrence h_t = a_t h_{t−1} + b_t over a sequence, in O(T) work.

Shapes (the state is a D-vector, or D independent k-vectors):
    diagonal:        a, b: [B, T, D]                     h0: [B, D]      -> h: [B, T, D]
    block-diagonal:  a: [B, T, D, k, k], b: [B, T, D, k]  h0: [B, D, k]   -> h: [B, T, D, k]
reverse=True runs from the end: h_t = a_t h_{t+1} + b_t, with h0 the state after the last step.
resets: bool [B, T]; where True the a_t term is dropped (h_{t−1}, or h_{t+1} in reverse, treated as 0),
which starts a new document inside a packed row.

The plain-PyTorch path is chunked: a sequential scan inside chunks of C ≈ ∛T steps, vectorised over all
chunks, then the same scan, recursively, over the T/C chunk summaries, then one vectorised fix-up. That is
O(T) work (O(T k³) for blocks) in ~2C + 2C' + ... torch calls (~130 at T = 16384). The backward is the same scan run the other way with
transposed coefficients (the adjoint), so autograd stores nothing per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# A forward-scan kernel: impl(a, b, h0, block) -> h (scan_reference, triton_scan.scan_triton).
ScanImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


# Below this many steps (or chunks) a scan is one sequential loop; above, it is chunked.
_SEQUENTIAL_BELOW = 16


def _chunk_size(T: int) -> int:
    """A power of two near T^(1/3): each level of the chunked scan costs ~2C torch calls and leaves T/C chunk
    ends to the next level (T = 16384: chunks of 32; their 511 ends in chunks of 8; those 63 in chunks of 4;
    the last 15 ends step by step). √T chunks, one level, took 3× as long on a CPU."""
    if T <= _SEQUENTIAL_BELOW:
        return T
    return max(1, min(256, 1 << round(math.log2(T) / 3)))


def apply_step(a: torch.Tensor, h: torch.Tensor, block: bool) -> torch.Tensor:
    """a·h for one step of the recurrence: elementwise (diagonal, block=False) or a batched k×k
    matrix-vector product (block=True; a [..., k, k], h [..., k])."""
    return (a @ h.unsqueeze(-1)).squeeze(-1) if block else a * h


def compose_steps(a2: torch.Tensor, a1: torch.Tensor, block: bool) -> torch.Tensor:
    """The transfer of step 1 then step 2, a2·a1: elementwise (diagonal) or a batched k×k matrix product."""
    return a2 @ a1 if block else a2 * a1


def _step_into(out: torch.Tensor, a: torch.Tensor, h: torch.Tensor, b: torch.Tensor, block: bool) -> None:
    """out = a·h + b, written into `out`, in the component layout of `_scan_components` (block: a [k, k, ...]
    as (row, column), h and b [k, ...]): one addcmul per state column."""
    if not block:
        torch.addcmul(b, a, h, out=out)
        return
    torch.addcmul(b, a[:, 0], h[0], out=out)
    for j in range(1, a.shape[0]):
        out.addcmul_(a[:, j], h[j])


def _compose_into(out: torch.Tensor, a2: torch.Tensor, a1: torch.Tensor, block: bool) -> None:
    """out = a2·a1 (step 1, then step 2), written into `out`; block: (a2 a1)[r, c] = Σ_j a2[r, j] a1[j, c]."""
    if not block:
        torch.mul(a2, a1, out=out)
        return
    torch.mul(a2[:, 0].unsqueeze(1), a1[0].unsqueeze(0), out=out)
    for j in range(1, a2.shape[0]):
        out.addcmul_(a2[:, j].unsqueeze(1), a1[j].unsqueeze(0))


def scan_reference(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: bool, reverse: bool = False
) -> torch.Tensor:
    """Forward scan (or, reverse=True, the scan from the end: h_t = a_t h_{t+1} + b_t, h0 entering the last
    step), chunked, no autograd bookkeeping of its own (callers wrap it).

    On a CPU its cost is the number of torch calls, not their arithmetic, so blocks are first laid out
    with their k×k components leading and D innermost: each call is then a contiguous elementwise op over
    [B, chunks, D] (k×k batched matmuls of four elements, or a trailing axis of size k, are many times
    slower)."""
    if not block:
        return _scan_components(a, b, h0, False, reverse)
    # (no copies where the cell already stores its blocks components first, as ParaLSTM does; the result
    # stays in that layout: a [B, T, D, k] view of [k, B, T, D])
    a, b = a.permute(3, 4, 0, 1, 2).contiguous(), b.permute(3, 0, 1, 2).contiguous()
    h = _scan_components(a, b, h0.permute(2, 0, 1), True, reverse)
    return h.permute(1, 2, 3, 0)


def _scan_components(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: bool, reverse: bool = False
) -> torch.Tensor:
    """scan_reference on a [*lead, B, T, D], b [*lead', B, T, D], h0 [*lead', B, D] (lead = (k, k) and
    lead' = (k,) for blocks, none for the diagonal): a sequential scan inside chunks of C steps, all
    chunks at once; then one step per chunk to carry the entry states; then one fix-up. Each call writes
    straight into its slice of the output, which spares an allocation per step. reverse walks every chunk,
    and the chunks, from the end, so that a reverse scan needs no flipped copies of its inputs and output."""
    la, lb = a.dim() - 3, b.dim() - 3  # leading component axes
    B, T, D = b.shape[lb:]
    C = _chunk_size(T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # zero steps after the last one the scan takes: their outputs are dropped and nothing follows them
        a_pad, b_pad = a.new_zeros(*a.shape[: la + 1], pad, D), b.new_zeros(*b.shape[: lb + 1], pad, D)
        a = torch.cat([a_pad, a] if reverse else [a, a_pad], dim=la + 1)
        b = torch.cat([b_pad, b] if reverse else [b, b_pad], dim=lb + 1)
    a = a.reshape(*a.shape[: la + 1], N, C, D)
    b = b.reshape(*b.shape[: lb + 1], N, C, D)
    local = torch.empty_like(b, memory_format=torch.contiguous_format)  # the scan inside each chunk from 0
    transfer = torch.empty_like(a, memory_format=torch.contiguous_format)  # the chunk's steps so far, composed
    a_i, b_i = a.unbind(la + 2), b.unbind(lb + 2)
    local_i, transfer_i = local.unbind(lb + 2), transfer.unbind(la + 2)
    steps = list(range(C))[::-1] if reverse else list(range(C))  # in the order the scan takes them
    local_i[steps[0]].copy_(b_i[steps[0]])
    transfer_i[steps[0]].copy_(a_i[steps[0]])
    for before, i in zip(steps, steps[1:]):
        _step_into(local_i[i], a_i[i], local_i[before], b_i[i], block)
        _compose_into(transfer_i[i], a_i[i], transfer_i[before], block)
    # the state entering each chunk [*lead', B, N, D]: h0, then the scan over the chunks' ends (itself chunked
    # when there are many chunks, so that a long sequence costs ~ 2 (C + C' + ...) calls, not T / C)
    entry = torch.empty_like(local_i[0])
    first, rest = (N - 1, 0) if reverse else (0, 1)  # the chunk h0 enters; where the others' entries start
    entry.select(lb + 1, first).copy_(h0)
    if N > 1:
        last = steps[-1]  # each chunk's end, in the scan's order
        ends = (transfer_i[last].narrow(la + 1, 1 - rest, N - 1), local_i[last].narrow(lb + 1, 1 - rest, N - 1))
        if N > _SEQUENTIAL_BELOW:
            entry.narrow(lb + 1, rest, N - 1).copy_(_scan_components(*ends, h0, block, reverse))
        else:
            entry_n, transfer_end, local_end = entry.unbind(lb + 1), ends[0].unbind(la + 1), ends[1].unbind(lb + 1)
            chunks = list(range(N))[::-1] if reverse else list(range(N))
            for before, n in zip(chunks, chunks[1:]):  # the end of chunk `before` enters chunk n
                _step_into(
                    entry_n[n], transfer_end[before - 1 + rest], entry_n[before], local_end[before - 1 + rest], block
                )
    # every step gets its chunk's entry state carried through the chunk: local += transfer · entry
    entry = entry.unsqueeze(lb + 2)
    if block:
        for j in range(a.shape[0]):
            local.addcmul_(transfer[:, j], entry[j])
    else:
        local.addcmul_(transfer, entry)
    return local.reshape(*local.shape[: lb + 1], N * C, D).narrow(lb + 1, pad if reverse else 0, T)


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
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, h0))
    if reverse and impl is scan_reference and not needs_grad:
        return scan_reference(a, b, h0, block, reverse=True)  # (Newton's adjoint) without the flipped copies
    if reverse:
        a, b = a.flip(1), b.flip(1)
    h: torch.Tensor = _ForwardScan.apply(a, b, h0, block, impl)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
    return h.flip(1) if reverse else h
