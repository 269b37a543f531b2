"""The M²RNN matrix-state recurrence, stepped sequentially: a PyTorch reference and a dispatcher to the
Triton kernels (kernels/triton_m2rnn.py). Per batch b and value head h, with q/k group g = h // (H // G):

    H_t = f_t · H_{t−1} + (1 − f_t) · tanh(H_{t−1} W_h + k_t v_tᵀ)      H_t ∈ R^{K×V}, W_h ∈ R^{V×V}
    y_t = q_tᵀ H_t                                                       y_t ∈ R^V

Shapes: q, k [B, T, G, K]; v [B, T, H, V]; f [B, T, H] (the forget gate, in (0, 1)); W [H, V, V];
h0 [B, H, K, V] or None (zeros); resets [B, T] bool or None: where True, H_{t−1} is taken as zero (a new
document starts at t). Both functions return (y [B, T, H, V], h_last [B, H, K, V]), h_last = the
state after the last step (h0 when T = 0).

State-gradient clipping (`clip`, a float c or None; the M²RNN authors' `gradient_clipping`, 1 in all their
training configs): the forward is unchanged; in the backward, the gradient carried back into H_t from the
steps after it (through H_{t+1}, and for t = T−1 the gradient of h_last) is clamped to [−c, c] at every step,
before y_t's own term q_t dy_tᵀ is added. That is what their Triton backward (the path their runs train
with) does; their PyTorch loop clamps the sum instead, a different rule that their tests never compare.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def m2rnn_shapes(
    q: Tensor, k: Tensor, v: Tensor, f: Tensor, W: Tensor, h0: Tensor | None = None
) -> tuple[int, int, int, int, int, int]:
    """(B, T, G, K, H, V), or a ValueError naming the argument whose shape does not fit."""
    if q.dim() != 4:
        raise ValueError(f"m2rnn: q must be [B, T, G, K], got shape {tuple(q.shape)}")
    B, T, G, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"m2rnn: k must be [B, T, G, K] = {tuple(q.shape)} like q, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"m2rnn: v must be [B, T, H, V] with B={B}, T={T} (from q), got {tuple(v.shape)}")
    H, V = v.shape[2:]
    if G < 1 or H % G:
        raise ValueError(f"m2rnn: the value heads H={H} (v) must be a multiple of the q/k heads G={G} (q, k)")
    if f.shape != (B, T, H):
        raise ValueError(f"m2rnn: f must be [B, T, H] = {(B, T, H)}, got {tuple(f.shape)}")
    if W.shape != (H, V, V):
        raise ValueError(f"m2rnn: W must be [H, V, V] = {(H, V, V)}, got {tuple(W.shape)}")
    if h0 is not None and h0.shape != (B, H, K, V):
        raise ValueError(f"m2rnn: h0 must be [B, H, K, V] = {(B, H, K, V)} or None, got {tuple(h0.shape)}")
    return B, T, G, K, H, V


class _ClampGrad(torch.autograd.Function):
    """Identity forward; the backward clamps the incoming gradient to [−c, c]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, c: float) -> Tensor:
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(-ctx.c, ctx.c), None


def clamp_grad(x: Tensor, c: float | None) -> Tensor:
    """x, whose gradient is clamped to [−c, c] in the backward (x itself when c is None)."""
    return x if c is None else _ClampGrad.apply(x, c)  # type: ignore[no-untyped-call]


def m2rnn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    W: Tensor,
    h0: Tensor | None = None,
    resets: Tensor | None = None,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence as a PyTorch loop over t (gradients by autograd), in the inputs' promoted dtype; `clip`
    clamps the state gradient carried back from later steps (the module docstring)."""
    B, T, G, K, H, V = m2rnn_shapes(q, k, v, f, W, h0)
    per = H // G
    qh, kh = q.repeat_interleave(per, dim=2), k.repeat_interleave(per, dim=2)  # [B, T, H, K]
    h = h0 if h0 is not None else v.new_zeros(B, H, K, V, dtype=torch.result_type(v, W))
    ys = []
    starts = resets.unbind(1) if resets is not None else [None] * T
    # unbind once: indexing x[:, t] inside the loop would make each step's backward touch all of x
    for qt, kt, vt, ft, st in zip(qh.unbind(1), kh.unbind(1), v.unbind(1), f.unbind(1), starts):
        if st is not None:
            h = h.masked_fill(st[:, None, None, None], 0)
        ft = ft[..., None, None]
        h = ft * h + (1 - ft) * torch.tanh(h @ W + kt.unsqueeze(-1) * vt.unsqueeze(-2))
        ys.append((qt.unsqueeze(-1) * h).sum(-2))
        h = clamp_grad(h, clip)  # the state as the next step (or h_last) reads it
    y = torch.stack(ys, dim=1) if ys else v.new_empty(B, 0, H, V, dtype=h.dtype)
    return y, h


def m2rnn_checkpointed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    W: Tensor,
    h0: Tensor | None = None,
    chunk: int = 32,
    resets: Tensor | None = None,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """m2rnn_reference run `chunk` steps at a time, each chunk under activation checkpointing: the forward
    keeps only the state entering each chunk (T/chunk states per head, as the Triton kernel's
    checkpoints), the backward recomputes one chunk's steps at a time. The same numbers as the reference;
    its T saved steps of several K×V tensors per head (gigabytes at 7B scale) become T/chunk."""
    from torch.utils.checkpoint import checkpoint

    T = q.shape[1]
    if T <= chunk or not torch.is_grad_enabled():
        return m2rnn_reference(q, k, v, f, W, h0, resets, clip)
    B, _, G, K, H, V = m2rnn_shapes(q, k, v, f, W, h0)
    h = h0 if h0 is not None else v.new_zeros(B, H, K, V, dtype=torch.result_type(v, W))
    ys = []
    for s in range(0, T, chunk):
        part = slice(s, s + chunk)
        y, h = checkpoint(
            m2rnn_reference,
            q[:, part],
            k[:, part],
            v[:, part],
            f[:, part],
            W,
            h,
            resets[:, part] if resets is not None else None,
            clip,
            use_reentrant=False,
            preserve_rng_state=False,
        )
        ys.append(y)
    return torch.cat(ys, dim=1), h


def m2rnn_sequential(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    W: Tensor,
    h0: Tensor | None = None,
    impl: str = "auto",
    resets: Tensor | None = None,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, h_last) by `impl`: "torch" (m2rnn_checkpointed: the reference, keeping a state per 32 steps),
    "triton" (m2rnn_triton), or "auto" (Triton for CUDA tensors, torch otherwise). Triton is imported only
    when used. `clip`: the state-gradient clipping of the module docstring, in every impl."""
    if clip is not None and not clip > 0:
        raise ValueError(f"m2rnn: clip must be positive or None, got {clip}")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"m2rnn_sequential: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    m2rnn_shapes(q, k, v, f, W, h0)
    if resets is not None and resets.shape != (q.shape[0], q.shape[1]):
        raise ValueError(f"m2rnn: resets must be [B, T] = {tuple(q.shape[:2])}, got {tuple(resets.shape)}")
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from unroll.kernels.triton_m2rnn import m2rnn_triton

        return m2rnn_triton(q, k, v, f, W, h0, resets, clip=clip)
    return m2rnn_checkpointed(q, k, v, f, W, h0, resets=resets, clip=clip)
