"""Triton kernels for the M²RNN recurrence (math and shapes in kernels/m2rnn_scan.py), forward and backward:
`m2rnn_triton(q, k, v, f, W, h0=None, resets=None)`, with the signature and semantics of `m2rnn_reference`.

One program per (batch, value head) steps through time; the K×V state, W and (backward) dW and dH stay in
registers, padded to powers of two (at least 16: tl.dot's smallest contraction) with masked loads and stores.
Per step the K×V·V×V product is a tl.dot at IEEE precision (TF32 would compound its error over T steps).

Forward: H_t = f_t H_{t−1} + (1 − f_t) U_t, U_t = tanh(Z_t), Z_t = H_{t−1} W + k_t v_tᵀ; y_t = q_tᵀ H_t.
Storing all T states for the backward would cost T·K·V per head (gigabytes at 7B scale), so only the state
entering each chunk of C steps is stored (checkpoints, [B·H, ⌈T/C⌉, KP, VP]), and only when a gradient is
needed.

Backward: the chunks in reverse. Each chunk's states H and activations U are recomputed from its checkpoint
into this program's scratch in global memory (C+1 states, C activations), then the reverse recursion runs
over the chunk's steps, t descending, with dH the gradient of H_t:
    dH ← clamp(dH, −c, c)                   (only with state-gradient clipping c, kernels/m2rnn_scan.py)
    dH += q_t dy_tᵀ                         (y_t reads H_t; dH starts as the gradient of h_last)
    G_t = (1 − f_t) dH ⊙ (1 − U_t²)         (the gradient of Z_t)
    dq_t = H_t dy_t,  dk_t = G_t v_t,  dv_t = G_tᵀ k_t,  df_t = Σ dH ⊙ (H_{t−1} − U_t),  dW += H_{t−1}ᵀ G_t
    dH ← f_t dH + G_t Wᵀ                    (now the gradient of H_{t−1}; after t = 0 it is dh0)
With resets (a document starting at t), H_{t−1} is zero where step t reads it, in the forward and the
recompute alike, and no gradient flows into the state before it (dH ← 0 there).
dq, dk are written per value head ([B, T, H, K]) and summed over each q/k group in torch; dW per (b, h),
summed over the batch in torch. Memory per (b, h): ⌈T/C⌉ checkpoints kept from the forward, 2C+1 tiles of
scratch during the backward; C = 32 (DEFAULT_CHUNK) is near the optimum √(T/2) for T ≈ 2-4k.

16-bit and float32 inputs are computed in float32 (checkpoints too, so the recompute is exact) and returned in
their dtype; float64 stays float64. Triton is imported here; without a GPU set TRITON_INTERPRET=1 before
importing this module.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from unroll.kernels.m2rnn_scan import m2rnn_shapes
from unroll.kernels.triton_scan import SUPPORTED_DTYPES, upcast

# The @triton.jit kernels stay unannotated: triton ships no type information (its jit is an untyped
# decorator to mypy), and Triton reads parameter annotations itself (tl.constexpr, type hints that change
# how an argument is specialised), so torch-style hints would change the kernels. The host code below is
# annotated.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

DEFAULT_CHUNK = 32


@triton.jit
def _tanh(z):
    # tl has no tanh; exp(−2|z|) ≤ 1 cannot overflow
    e = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -r, r)


@triton.jit
def _load_step(q_ptr, k_ptr, v_ptr, f_ptr, b, t, g, h, T, G, H, K, V, i, j, F64: tl.constexpr):
    """q_t, k_t [KP] (group g), v_t [VP] and f_t (value head h) of batch b, zero-padded."""
    row = b.to(tl.int64) * T + t
    qt = upcast(tl.load(q_ptr + (row * G + g) * K + i, mask=i < K, other=0.0), F64)
    kt = upcast(tl.load(k_ptr + (row * G + g) * K + i, mask=i < K, other=0.0), F64)
    vt = upcast(tl.load(v_ptr + (row * H + h) * V + j, mask=j < V, other=0.0), F64)
    ft = upcast(tl.load(f_ptr + row * H + h), F64)
    return qt, kt, vt, ft, row


@triton.jit
def _reset(S, r_ptr, row, HAS_RESETS: tl.constexpr):
    """S, or zeros where a document starts at this (b, t) row."""
    if HAS_RESETS:
        S = tl.where(tl.load(r_ptr + row) != 0, 0.0, S)
    return S


@triton.jit
def _cell(S, W, kt, vt, ft):
    """(U_t, H_t) from S = H_{t−1}. Padding stays zero: padded rows/columns of S, W, k, v are zero."""
    U = _tanh(tl.dot(S, W, input_precision="ieee") + kt[:, None] * vt[None, :])
    return U, ft * S + (1.0 - ft) * U


@triton.jit
def _head(w_ptr, T, H, G, K, V, KP: tl.constexpr, VP: tl.constexpr, F64: tl.constexpr):
    """This program's (b, h, g), index vectors, offsets of a [K, V] state and of a padded tile, and W_h."""
    pid = tl.program_id(0)  # b·H + h
    b, h = pid // H, pid % H
    g = h // (H // G)
    i, j = tl.arange(0, KP), tl.arange(0, VP)
    kv_offs = i[:, None] * V + j[None, :]
    kv_mask = (i < K)[:, None] & (j < V)[None, :]
    tile = i[:, None] * VP + j[None, :]
    vv_offs = j[:, None] * V + j[None, :]
    vv_mask = (j < V)[:, None] & (j < V)[None, :]
    W = upcast(tl.load(w_ptr + h * V * V + vv_offs, mask=vv_mask, other=0.0), F64)
    return pid.to(tl.int64), b, h, g, i, j, kv_offs, kv_mask, tile, vv_offs, vv_mask, W


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    f_ptr,
    w_ptr,
    h0_ptr,
    r_ptr,
    y_ptr,
    hT_ptr,
    ck_ptr,
    T,
    H,
    G,
    K,
    V,
    NC,
    C: tl.constexpr,
    KP: tl.constexpr,
    VP: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    SAVE: tl.constexpr,
    F64: tl.constexpr,
):
    """y, h_last, and (SAVE) the state entering each chunk c into ck[pid, c]."""
    # every value named, none `_`: Triton takes a `_` bound before a loop and again inside it for one
    # loop-carried variable and refuses its change of type (triton 3.6 on an H200)
    pid, b, h, g, i, j, kv_offs, kv_mask, tile, vv_offs, vv_mask, W = _head(w_ptr, T, H, G, K, V, KP, VP, F64)
    if HAS_H0:
        S = upcast(tl.load(h0_ptr + pid * K * V + kv_offs, mask=kv_mask, other=0.0), F64)
    else:
        S = tl.zeros([KP, VP], dtype=W.dtype)
    for c in range(NC):
        if SAVE:
            tl.store(ck_ptr + (pid * NC + c) * KP * VP + tile, S)
        for s in range(tl.minimum(C, T - c * C)):
            qt, kt, vt, ft, row = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, b, c * C + s, g, h, T, G, H, K, V, i, j, F64)
            U, S = _cell(_reset(S, r_ptr, row, HAS_RESETS), W, kt, vt, ft)
            y = tl.sum(qt[:, None] * S, axis=0)
            tl.store(y_ptr + (row * H + h) * V + j, y.to(y_ptr.dtype.element_ty), mask=j < V)
    tl.store(hT_ptr + pid * K * V + kv_offs, S.to(hT_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    f_ptr,
    w_ptr,
    r_ptr,
    ck_ptr,
    dy_ptr,
    dhT_ptr,
    sh_ptr,
    su_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    df_ptr,
    dw_ptr,
    dh0_ptr,
    T,
    H,
    G,
    K,
    V,
    NC,
    clip,
    C: tl.constexpr,
    KP: tl.constexpr,
    VP: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    CLIP: tl.constexpr,
    F64: tl.constexpr,
):
    """Gradients per (b, h): dq, dk [B, T, H, K], dv [B, T, H, V], df [B, T, H], dW [B, H, V, V], dh0."""
    pid, b, h, g, i, j, kv_offs, kv_mask, tile, vv_offs, vv_mask, W = _head(w_ptr, T, H, G, K, V, KP, VP, F64)
    dS = upcast(tl.load(dhT_ptr + pid * K * V + kv_offs, mask=kv_mask, other=0.0), F64)
    dW = tl.zeros([VP, VP], dtype=W.dtype)
    sh = sh_ptr + pid * (C + 1) * KP * VP  # slot s: the state before step s of the chunk (slot n: after it)
    su = su_ptr + pid * C * KP * VP  # slot s: U of step s
    for cr in range(NC):
        c = NC - 1 - cr
        n = tl.minimum(C, T - c * C)
        S = tl.load(ck_ptr + (pid * NC + c) * KP * VP + tile)
        tl.store(sh + tile, S)
        for s in range(n):
            qt, kt, vt, ft, row = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, b, c * C + s, g, h, T, G, H, K, V, i, j, F64)
            U, S = _cell(_reset(S, r_ptr, row, HAS_RESETS), W, kt, vt, ft)
            tl.store(su + s * KP * VP + tile, U)
            tl.store(sh + (s + 1) * KP * VP + tile, S)
        tl.debug_barrier()  # the reverse pass reads scratch that other threads of this program wrote
        for sr in range(n):
            s = n - 1 - sr
            qt, kt, vt, ft, row = _load_step(q_ptr, k_ptr, v_ptr, f_ptr, b, c * C + s, g, h, T, G, H, K, V, i, j, F64)
            hv = row * H + h  # the (b, t, h) row of the per-value-head outputs
            dyt = upcast(tl.load(dy_ptr + hv * V + j, mask=j < V, other=0.0), F64)
            prev = _reset(tl.load(sh + s * KP * VP + tile), r_ptr, row, HAS_RESETS)  # the state step s read
            cur = tl.load(sh + (s + 1) * KP * VP + tile)
            U = tl.load(su + s * KP * VP + tile)
            if CLIP:
                dS = tl.minimum(tl.maximum(dS, -clip), clip)
            dS += qt[:, None] * dyt[None, :]
            Gt = (1.0 - ft) * dS * (1.0 - U * U)
            dW = tl.dot(tl.trans(prev), Gt, dW, input_precision="ieee")
            tl.store(dq_ptr + hv * K + i, tl.sum(cur * dyt[None, :], axis=1), mask=i < K)
            tl.store(dk_ptr + hv * K + i, tl.sum(Gt * vt[None, :], axis=1), mask=i < K)
            tl.store(dv_ptr + hv * V + j, tl.sum(Gt * kt[:, None], axis=0), mask=j < V)
            tl.store(df_ptr + hv, tl.sum(tl.sum(dS * (prev - U), axis=1), axis=0))
            dS = _reset(ft * dS + tl.dot(Gt, tl.trans(W), input_precision="ieee"), r_ptr, row, HAS_RESETS)
        tl.debug_barrier()  # the next chunk's recompute overwrites scratch that this pass read
    tl.store(dh0_ptr + pid * K * V + kv_offs, dS, mask=kv_mask)
    tl.store(dw_ptr + pid * V * V + vv_offs, dW, mask=vv_mask)


# ------------------------------------------------------------------------------------------------ launch


def _pad(n: int) -> int:
    """A power of two ≥ max(n, 16): tl.dot needs a contraction of at least 16 (8 for float32)."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def _warps(KP: int, VP: int) -> int:
    return 4 if KP * VP <= 2048 else 8  # untuned: keep the ~6 K×V tiles of the backward off local memory


def _interpreted() -> bool:
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


class _M2RNN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        f: torch.Tensor,
        W: torch.Tensor,
        h0: torch.Tensor | None,
        resets: torch.Tensor | None,
        chunk: int,
        clip: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, G, K, H, V = m2rnn_shapes(q, k, v, f, W, h0)
        xs = (q, k, v, f, W) + ((h0,) if h0 is not None else ())
        dtype = functools.reduce(torch.promote_types, [x.dtype for x in xs])
        f64 = dtype == torch.float64
        cdt = torch.float64 if f64 else torch.float32
        q, k, v, f, W = (x.contiguous() for x in (q, k, v, f, W))
        KP, VP, NC = _pad(K), _pad(V), -(-T // chunk)
        save = any(ctx.needs_input_grad[:6]) and T > 0
        ck = torch.empty((B * H, NC, KP, VP) if save else (1,), dtype=cdt, device=v.device)
        y = torch.empty((B, T, H, V), dtype=dtype, device=v.device)
        hT = torch.empty((B, H, K, V), dtype=dtype, device=v.device)
        h0c = h0.contiguous() if h0 is not None else hT  # (a dummy pointer when HAS_H0 is off)
        starts = resets.to(torch.uint8).contiguous() if resets is not None else hT  # (likewise)
        if B * H:
            _fwd_kernel[(B * H,)](
                q,
                k,
                v,
                f,
                W,
                h0c,
                starts,
                y,
                hT,
                ck,
                T,
                H,
                G,
                K,
                V,
                NC,
                C=chunk,
                KP=KP,
                VP=VP,
                HAS_H0=h0 is not None,
                HAS_RESETS=resets is not None,
                SAVE=save,
                F64=f64,
                num_warps=_warps(KP, VP),
            )
        ctx.save_for_backward(q, k, v, f, W, ck, starts)
        ctx.meta = (chunk, h0 is not None, h0.dtype if h0 is not None else None, f64, resets is not None, clip)
        return y, hT

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor, dhT: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, f, W, ck, starts = ctx.saved_tensors
        chunk, has_h0, h0_dtype, f64, has_resets, clip = ctx.meta
        B, T, G, K = q.shape
        H, V = v.shape[2:]
        cdt = torch.float64 if f64 else torch.float32
        KP, VP, NC = _pad(K), _pad(V), -(-T // chunk)
        dev = v.device
        dq, dk = (torch.zeros((B, T, H, K), dtype=cdt, device=dev) for _ in range(2))  # per value head
        dv, df = torch.zeros((B, T, H, V), dtype=cdt, device=dev), torch.zeros((B, T, H), dtype=cdt, device=dev)
        dW = torch.zeros((B, H, V, V), dtype=cdt, device=dev)  # per batch element
        dh0 = dhT.to(cdt).contiguous().clone()  # T = 0: h_last is h0
        if T and B * H:
            sh = torch.empty((B * H, chunk + 1, KP, VP), dtype=cdt, device=dev)
            su = torch.empty((B * H, chunk, KP, VP), dtype=cdt, device=dev)
            _bwd_kernel[(B * H,)](
                q,
                k,
                v,
                f,
                W,
                starts,
                ck,
                dy.contiguous(),
                dhT.contiguous(),
                sh,
                su,
                dq,
                dk,
                dv,
                df,
                dW,
                dh0,
                T,
                H,
                G,
                K,
                V,
                NC,
                float(clip or 0.0),
                C=chunk,
                KP=KP,
                VP=VP,
                HAS_RESETS=has_resets,
                CLIP=clip is not None,
                F64=f64,
                num_warps=_warps(KP, VP),
            )
        per = H // G
        return (
            dq.view(B, T, G, per, K).sum(3).to(q.dtype),
            dk.view(B, T, G, per, K).sum(3).to(k.dtype),
            dv.to(v.dtype),
            df.to(f.dtype),
            dW.sum(0).to(W.dtype),
            dh0.to(h0_dtype) if has_h0 else None,
            None,
            None,
            None,
        )


def m2rnn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    W: torch.Tensor,
    h0: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, H, V], h_last [B, H, K, V]) as `m2rnn_reference`, by the Triton kernels, differentiable in
    q, k, v, f, W and h0; resets [B, T] bool: the state is zero where a document starts. chunk: steps
    between the forward's checkpoints (a power of two; the backward recomputes a chunk at a time, memory
    T/chunk states per head instead of T); clip: the state-gradient clipping of kernels/m2rnn_scan.py."""
    m2rnn_shapes(q, k, v, f, W, h0)
    for name, x in (("q", q), ("k", k), ("v", v), ("f", f), ("W", W), ("h0", h0)):
        if x is None:
            continue
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"m2rnn_triton: {name} is {x.dtype}; float16, bfloat16, float32 or float64 expected")
        if x.device != v.device:
            raise ValueError(f"m2rnn_triton: {name} is on {x.device}, v on {v.device}")
    if v.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            "Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set before "
            f"unroll.kernels.triton_m2rnn is imported); got tensors on {v.device}"
        )
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"m2rnn_triton: chunk must be a power of two, got {chunk}")
    # torch leaves Function.apply unannotated
    if resets is not None and (resets.shape != q.shape[:2] or resets.device != v.device):
        raise ValueError(f"m2rnn_triton: resets must be [B, T] = {tuple(q.shape[:2])} on {v.device}")
    y, h_last = _M2RNN.apply(q, k, v, f, W, h0, resets, chunk, clip)  # type: ignore[no-untyped-call]
    return y, h_last
