"""Triton kernels for the forward linear scan h_t = a_t h_{t−1} + b_t: `scan_triton`, a drop-in `impl` for
`linear_scan` with the signature and semantics of `scan_reference` (kernels/linear_scan.py).

Shapes as in linear_scan: diagonal a, b [B, T, D], h0 [B, D]; block-diagonal a [B, T, D, k, k],
b [B, T, D, k], h0 [B, D, k]. Resets are already folded into `a`; the backward and reverse=True are this
same forward scan run by linear_scan on flipped, transposed inputs.

Parallel over the sequence, O(T) work (O(T k³) for blocks), in chunks of C steps:
  1. chunk summaries, one program per (chunk, channel block, batch), for every chunk but the last: the
     chunk's scan from a zero state, H_n (its end state), and its transfer A_n (the product of its a's,
     a k×k product for blocks). Diagonal: one tl.associative_scan over a [C, BLOCK_D] tile; blocks: C
     sequential matvec/matmul steps inside the program (broadcast and tl.sum).
  2. the states after each chunk, S_n = A_n S_{n−1} + H_n from S_{−1} = h0: the same problem on N−1
     summaries instead of T steps, solved by calling this scan recursively (a few levels: N ≈ T / C).
  3. one program per (chunk, channel block, batch): the chunk rescanned from its true entry state
     (h0 or S_{n−1}), written out.
When T ≤ C there is one chunk and only step 3 runs, from h0.
16-bit inputs are computed in float32 (summaries included) and returned in their dtype; float64 stays
float64. Triton is imported here; without a GPU set TRITON_INTERPRET=1 before importing this module.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The @triton.jit kernels stay unannotated: triton ships no type information (its jit is an untyped
# decorator to mypy), and Triton reads parameter annotations itself (tl.constexpr, type hints that change
# how an argument is specialised), so torch-style hints would change the kernels. The host code below is
# annotated.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

# The input dtypes the Triton kernels (this module's and triton_m2rnn's) accept.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def upcast(x, F64: tl.constexpr):
    """x in the compute dtype: float64 for float64 problems (F64), float32 otherwise (also triton_m2rnn's)."""
    if F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _combine(a1, b1, a2, b2):
    """Step 1 then step 2 of h -> a h + b."""
    return a2 * a1, a2 * b1 + b2


# ----------------------------------------------------------------------------------------------- diagonal


@triton.jit
def _diag_tile(a_ptr, b_ptr, pid_b, c, db, T, D, C: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr):
    """The [C, BLOCK_D] tile of chunk c scanned from a zero state: (prefix products of a, local states)."""
    rows = tl.arange(0, C)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    t = c * C + rows
    mask = (t < T)[:, None] & (cols < D)[None, :]
    offs = (pid_b.to(tl.int64) * T + t[:, None]) * D + cols[None, :]
    a = upcast(tl.load(a_ptr + offs, mask=mask, other=0.0), F64)
    b = upcast(tl.load(b_ptr + offs, mask=mask, other=0.0), F64)
    A, H = tl.associative_scan((a, b), 0, _combine)
    return A, H, rows, cols, offs, mask


@triton.jit
def _diag_summary_kernel(
    a_ptr, b_ptr, A_ptr, H_ptr, T, D, M, C: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr
):
    """Chunks 0..M−1 (all full): A_n = Π a, H_n = the chunk's end state from 0, into [B, M, D]."""
    pid, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.cdiv(D, BLOCK_D)
    c, db = pid // n_db, pid % n_db
    A, H, rows, cols, _, _ = _diag_tile(a_ptr, b_ptr, pid_b, c, db, T, D, C, BLOCK_D, F64)
    # Only the last row is wanted: a masked store of the whole tile onto one row of the summary.
    dst = ((pid_b.to(tl.int64) * M + c) * D + cols)[None, :] + 0 * rows[:, None]
    last = (rows == C - 1)[:, None] & (cols < D)[None, :]
    tl.store(A_ptr + dst, A, mask=last)
    tl.store(H_ptr + dst, H, mask=last)


@triton.jit
def _diag_chunk_kernel(
    a_ptr, b_ptr, h0_ptr, S_ptr, out_ptr, T, D, M, C: tl.constexpr, BLOCK_D: tl.constexpr, F64: tl.constexpr
):
    """Chunk c from its entry state (h0 for c = 0, else S[:, c−1] of [B, M, D]): h = H + A·entry."""
    pid, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.cdiv(D, BLOCK_D)
    c, db = pid // n_db, pid % n_db
    A, H, rows, cols, offs, mask = _diag_tile(a_ptr, b_ptr, pid_b, c, db, T, D, C, BLOCK_D, F64)
    if c == 0:
        entry = upcast(tl.load(h0_ptr + pid_b.to(tl.int64) * D + cols, mask=cols < D, other=0.0), F64)
    else:
        entry = upcast(tl.load(S_ptr + (pid_b.to(tl.int64) * M + c - 1) * D + cols, mask=cols < D, other=0.0), F64)
    h = H + A * entry[None, :]
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- block-diagonal


# Layouts: the contracted index l comes first in every product ([l, i, d] for a matvec, [l, i, d, j] for a
# matrix product), the channel and output indices after it. Triton spreads threads over the trailing
# dimensions, so most of each sum stays inside a thread (with l in the middle, the k×k product was
# reduced across warps, through shared memory, several barriers a step, and ran many times slower on an
# H200); and Σ_l over [l, i, ...] leaves [i, ...], already indexed as the next step's operand.


@triton.jit
def _block_offsets(db, D, K, BD: tl.constexpr, KP: tl.constexpr):
    """For BD channels d of one step: offsets and masks of aᵀ as [l, i, d] (a[d, i, l]) and of the k-vectors
    as [i, d], and the identity as [l, d, j]."""
    d = db * BD + tl.arange(0, BD)
    i = tl.arange(0, KP)
    l3, i3, d3 = i[:, None, None], i[None, :, None], d[None, None, :]
    a_offs = d3 * (K * K) + i3 * K + l3
    a_mask = (d3 < D) & (i3 < K) & (l3 < K)
    v_offs = d[None, :] * K + i[:, None]
    v_mask = (d[None, :] < D) & (i[:, None] < K)
    eye = (i[:, None, None] == i[None, None, :]) & (d[None, :, None] >= 0)
    return a_offs, a_mask, v_offs, v_mask, eye


@triton.jit
def _block_summary_kernel(
    a_ptr, b_ptr, A_ptr, H_ptr, T, D, K, M, C: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, F64: tl.constexpr
):
    """Chunks 0..M−1 (all full), C sequential steps each: H_n (end state from 0) into [B, M, D, k] and the
    transfer A_n = a_{last} ··· a_{first} into [B, M, D, k, k]."""
    pid, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.cdiv(D, BD)
    c, db = pid // n_db, pid % n_db
    a_offs, a_mask, v_offs, v_mask, eye = _block_offsets(db, D, K, BD, KP)
    step_a, step_v = D * K * K, D * K  # elements per time step
    row = pid_b.to(tl.int64) * T + c * C  # the (batch, step) row where the chunk starts
    pa = a_ptr + row * step_a + a_offs
    pb = b_ptr + row * step_v + v_offs
    a_cur = upcast(tl.load(pa, mask=a_mask, other=0.0), F64)  # aᵀ [l, i, d]
    b_cur = upcast(tl.load(pb, mask=v_mask, other=0.0), F64)  # [i, d]
    h = tl.zeros([KP, BD], dtype=b_cur.dtype)  # [l, d]
    A = eye.to(a_cur.dtype)  # [l, d, j]
    for s in range(C):
        pa += step_a  # prefetch the next step while this one computes
        pb += step_v
        more = s + 1 < C
        a_nxt = tl.load(pa, mask=tl.where(more, a_mask, False), other=0.0).to(a_cur.dtype)
        b_nxt = tl.load(pb, mask=tl.where(more, v_mask, False), other=0.0).to(b_cur.dtype)
        h = tl.sum(a_cur * h[:, None, :], axis=0) + b_cur  # (a h)[i] = Σ_l a[i, l] h[l]
        A = tl.sum(a_cur[:, :, :, None] * A[:, None, :, :], axis=0)  # (a A)[i, j] = Σ_l a[i, l] A[l, j]
        a_cur, b_cur = a_nxt, b_nxt
    dst = pid_b.to(tl.int64) * M + c
    i = tl.arange(0, KP)  # A is [i, d, j]: element (d, i, j) of the summary, at d k² + i k + j
    i3, d3, j3 = i[:, None, None], (db * BD + tl.arange(0, BD))[None, :, None], i[None, None, :]
    tl.store(A_ptr + dst * step_a + d3 * (K * K) + i3 * K + j3, A, mask=(i3 < K) & (d3 < D) & (j3 < K))
    tl.store(H_ptr + dst * step_v + v_offs, h, mask=v_mask)


@triton.jit
def _block_chunk_kernel(
    a_ptr,
    b_ptr,
    h0_ptr,
    S_ptr,
    out_ptr,
    T,
    D,
    K,
    M,
    C: tl.constexpr,
    BD: tl.constexpr,
    KP: tl.constexpr,
    F64: tl.constexpr,
):
    """Chunk c stepped from its entry state (h0 for c = 0, else S[:, c−1] of [B, M, D, k]), written out."""
    pid, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.cdiv(D, BD)
    c, db = pid // n_db, pid % n_db
    a_offs, a_mask, v_offs, v_mask, _ = _block_offsets(db, D, K, BD, KP)
    if c == 0:
        h = upcast(tl.load(h0_ptr + pid_b.to(tl.int64) * D * K + v_offs, mask=v_mask, other=0.0), F64)
    else:
        h = upcast(tl.load(S_ptr + (pid_b.to(tl.int64) * M + c - 1) * D * K + v_offs, mask=v_mask, other=0.0), F64)
    n = tl.minimum(C, T - c * C)
    step_a, step_v = D * K * K, D * K  # elements per time step
    row = pid_b.to(tl.int64) * T + c * C  # the (batch, step) row where the chunk starts
    pa = a_ptr + row * step_a + a_offs
    pb = b_ptr + row * step_v + v_offs
    po = out_ptr + row * step_v + v_offs
    a_cur = upcast(tl.load(pa, mask=a_mask, other=0.0), F64)  # aᵀ [l, i, d]
    b_cur = upcast(tl.load(pb, mask=v_mask, other=0.0), F64)  # [i, d]
    for s in range(n):
        pa += step_a  # prefetch the next step while this one computes
        pb += step_v
        more = s + 1 < n  # (a scalar: `mask & more` would be int32 in the interpreter)
        a_nxt = tl.load(pa, mask=tl.where(more, a_mask, False), other=0.0).to(a_cur.dtype)
        b_nxt = tl.load(pb, mask=tl.where(more, v_mask, False), other=0.0).to(b_cur.dtype)
        h = tl.sum(a_cur * h[:, None, :], axis=0) + b_cur  # (a h)[i] = Σ_l a[i, l] h[l]
        tl.store(po, h.to(out_ptr.dtype.element_ty), mask=v_mask)
        po += step_v
        a_cur, b_cur = a_nxt, b_nxt


# ------------------------------------------------------------------------------------------------ launch


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def default_chunk(T: int, block: bool) -> int:
    """Steps per chunk. Diagonal: ≈ √T (16..256), so the chunk summaries fit one more chunk and the
    recursion is two levels up to T = 65536. Blocks, stepped sequentially inside a program: ≈ ∛T (8..64),
    a shorter critical path (about 2C per level) at the price of a third level."""
    if block:
        return min(64, max(8, _pow2(round(T ** (1 / 3)))))
    return min(256, max(16, _pow2(math.isqrt(max(T - 1, 0)) + 1)))


# (channels per program, warps) for the summary (k³ per step) and chunk (k² per step) kernels, by the
# padded k: the fastest of a sweep on an H200 (B=1, T=16384, D=64, C=32; k=2 with D=256). One warp per
# program is best for the k³ products up to k=16; the chunk kernel is bandwidth-bound from k=8 up.
_BLOCK_LAUNCH = {
    1: ((128, 4), (128, 4)),
    2: ((128, 4), (128, 4)),
    4: ((8, 1), (16, 1)),
    8: ((4, 1), (8, 1)),
    16: ((1, 1), (8, 4)),
}


def _block_launch(KP: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if KP in _BLOCK_LAUNCH:
        return _BLOCK_LAUNCH[KP]
    return (1, min(8, KP**3 // 4096)), (max(1, 2048 // KP**2), 4)  # untuned: ≤ 128 products a thread


def interpreted() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1 when triton was imported), where the
    kernels run on CPU tensors."""
    return type(_diag_chunk_kernel).__name__ == "InterpretedFunction"


def _scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, out: torch.Tensor, block: bool, C: int, f64: bool
) -> None:
    """Writes into `out` the scan of contiguous a, b from contiguous h0, in chunks of C (recursive)."""
    B, T, D = b.shape[:3]
    N = -(-T // C)
    M = N - 1  # chunks with a summary: all but the last
    cdt = torch.float64 if f64 else torch.float32
    if block:
        K = b.shape[3]
        KP = _pow2(K)
        (bd1, w1), (bd3, w3) = _block_launch(KP)
        bd1, bd3 = min(_pow2(D), bd1), min(_pow2(D), bd3)
        S = h0
        if M:
            A = torch.empty((B, M, D, K, K), dtype=cdt, device=b.device)
            H = torch.empty((B, M, D, K), dtype=cdt, device=b.device)
            _block_summary_kernel[(M * triton.cdiv(D, bd1), B)](
                a, b, A, H, T, D, K, M, C=C, BD=bd1, KP=KP, F64=f64, num_warps=w1
            )
            S = torch.empty_like(H)
            _scan(A, H, h0, S, block, C, f64)
        _block_chunk_kernel[(N * triton.cdiv(D, bd3), B)](
            a, b, h0, S, out, T, D, K, M, C=C, BD=bd3, KP=KP, F64=f64, num_warps=w3
        )
    else:
        block_d = min(_pow2(D), max(16, 8192 // C))
        warps = 8 if C * block_d >= 8192 else 4
        S = h0
        if M:
            A = torch.empty((B, M, D), dtype=cdt, device=b.device)
            H = torch.empty((B, M, D), dtype=cdt, device=b.device)
            _diag_summary_kernel[(M * triton.cdiv(D, block_d), B)](
                a, b, A, H, T, D, M, C=C, BLOCK_D=block_d, F64=f64, num_warps=warps
            )
            S = torch.empty_like(H)
            _scan(A, H, h0, S, block, C, f64)
        _diag_chunk_kernel[(N * triton.cdiv(D, block_d), B)](
            a, b, h0, S, out, T, D, M, C=C, BLOCK_D=block_d, F64=f64, num_warps=warps
        )


def scan_triton(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: bool, *, chunk: int | None = None
) -> torch.Tensor:
    """Forward scan h_t = a_t h_{t−1} + b_t from h0, as `scan_reference` (a drop-in `impl` for linear_scan).

    chunk: steps per chunk, a power of two (default: `default_chunk(T, block)`); small values force the
    multi-level path, which is what the tests do.
    """
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"scan_triton: {name} is {x.dtype}; float16, bfloat16, float32 or float64 expected")
    if not (a.device == b.device == h0.device):
        raise ValueError(f"scan_triton: a, b, h0 on different devices ({a.device}, {b.device}, {h0.device})")
    if b.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            "Triton kernels need a CUDA device or TRITON_INTERPRET=1 (set before "
            f"unroll.kernels.triton_scan is imported); got tensors on {b.device}"
        )
    B, T = b.shape[:2]
    state = b.shape[2:]
    if a.shape != ((B, T) + state + state[-1:] if block else b.shape) or h0.shape != (B,) + state:
        raise ValueError(
            f"scan_triton: a {tuple(a.shape)}, b {tuple(b.shape)}, h0 {tuple(h0.shape)} do not "
            f"form a {'block-diagonal' if block else 'diagonal'} scan"
        )
    C = chunk or default_chunk(T, block)
    if C < 1 or C & (C - 1):
        raise ValueError(f"scan_triton: chunk must be a power of two, got {C}")
    out = torch.empty(b.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=b.device)
    if out.numel():
        f64 = torch.float64 in (a.dtype, b.dtype, h0.dtype)
        _scan(a.contiguous(), b.contiguous(), h0.contiguous(), out, block, C, f64)
    return out
