"""The fused Newton kernels (kernels/triton_newton.py) for cells whose state per channel is a pair with a 2×2
Jacobian (ParaLSTM's (c, h)): the same programs, sweeps, buffers and convergence test, with each channel's
state, correction and adjoint a 2-vector and the scans over 2×2 affine maps.

A cell's Triton code (`FusedBlock2Kernel`; ParaLSTM's in kernels/triton_cells.py) is two @triton.jit functions
over [C, BLOCK_D] tiles, the state given as its two components s1, s2:
    value_and_jacobian(s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
        -> (f1, f2, J11, J12, J21, J22)                      J_ij = ∂f_i/∂s_j (of the previous state)
    vjp(s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, l1, l2, du_ptrs, F64)
        -> (ds1, ds2, dp0, dp1, dp2, dp3, dp4)
with the layouts of triton_newton's contract (states [B, T, D, 2]: component k of channel d at 2d + k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from unroll.kernels.triton_newton import _inputs, _launch
from unroll.kernels.triton_scan import upcast

# mypy: disable-error-code="untyped-decorator,no-untyped-def"

MAX_PARAMS = 5  # per-channel parameter vectors a 2×2 cell may have (the vjp returns this many)
# The same inside kernels: compiled Triton reads only globals that are constexprs (the interpreter reads any).
_MAX_PARAMS = tl.constexpr(MAX_PARAMS)


@dataclass(frozen=True)
class FusedBlock2Kernel:
    """A 2×2-block cell's Triton code (the module docstring gives the contract)."""

    value_and_jacobian: Any  # a @triton.jit function
    vjp: Any  # a @triton.jit function


@triton.jit
def _combine2(a11, a12, a21, a22, b1, b2, c11, c12, c21, c22, d1, d2):
    """Map (a, b) then map (c, d), each s -> M s + v with a 2×2 M: (c·a, c·b + d)."""
    return (
        c11 * a11 + c12 * a21,
        c11 * a12 + c12 * a22,
        c21 * a11 + c22 * a21,
        c21 * a12 + c22 * a22,
        c11 * b1 + c12 * b2 + d1,
        c21 * b1 + c22 * b2 + d2,
    )


@triton.jit
def _tile2(pid_b, c, cols, T, D, C: tl.constexpr):
    """Rows of chunk c, the offsets of component 0 of a [B, T, D, 2] tensor's [C, BLOCK_D] tile, and its mask."""
    rows = c * C + tl.arange(0, C)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    offs = ((pid_b.to(tl.int64) * T + rows[:, None]) * D + cols[None, :]) * 2
    return rows, offs, mask


@triton.jit
def _previous2(buf_ptr, offs, mask, rows, first1, first2, reset_ptr, pid_b, T, D, HAS_RESETS: tl.constexpr,
               F64: tl.constexpr):  # fmt: skip
    """s_{t−1} of a tile from the buffer (row 0 of the sequence: first1/2 = s0), zero where a document starts."""
    before = mask & (rows > 0)[:, None]
    s1 = upcast(tl.load(buf_ptr + offs - 2 * D, mask=before, other=0.0), F64)
    s2 = upcast(tl.load(buf_ptr + offs - 2 * D + 1, mask=before, other=0.0), F64)
    s1 = tl.where((rows == 0)[:, None], first1[None, :], s1)
    s2 = tl.where((rows == 0)[:, None], first2[None, :], s2)
    if HAS_RESETS:
        starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
        s1 = tl.where(starts[:, None], 0.0, s1)
        s2 = tl.where(starts[:, None], 0.0, s2)
    return s1, s2


@triton.jit
def _newton2_kernel(
    u_ptr, p_ptr, s0_ptr, reset_ptr, buf_ptr, iters_ptr, res_ptr, T, D, n_chunks, tol, max_iters,
    CELL: tl.constexpr, G: tl.constexpr, HAS_RESETS: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
    F64: tl.constexpr,
):  # fmt: skip
    """triton_newton's _newton_kernel for 2-vector states: buf [2, B, T, D, 2], s0 [B, D, 2]."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.num_programs(0)
    B = tl.num_programs(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = (pid_b.to(tl.int64) * D + cols) * 2
    first1 = upcast(tl.load(s0_ptr + base, mask=col_mask, other=0.0), F64)
    first2 = upcast(tl.load(s0_ptr + base + 1, mask=col_mask, other=0.0), F64)
    zero = tl.zeros([BLOCK_D], dtype=first1.dtype)
    slot = B.to(tl.int64) * T * D * 2
    for c in range(n_chunks):  # the first guess f(0, x), s0 at t = 0
        rows, offs, mask = _tile2(pid_b, c, cols, T, D, C)
        s1 = tl.where((rows == 0)[:, None], first1[None, :], 0.0)
        s2 = tl.where((rows == 0)[:, None], first2[None, :], 0.0)
        if HAS_RESETS:
            starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
            s1 = tl.where(starts[:, None], 0.0, s1)
            s2 = tl.where(starts[:, None], 0.0, s2)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        f1, f2, _, _, _, _ = CELL(s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
        tl.store(buf_ptr + offs, f1.to(buf_ptr.dtype.element_ty), mask=mask)
        tl.store(buf_ptr + offs + 1, f2.to(buf_ptr.dtype.element_ty), mask=mask)

    cur = pid_b * 0
    iterations = pid_b * 0
    residual = tl.max(tl.full([BLOCK_D], float("inf"), first1.dtype), axis=0)
    searching = pid_b == pid_b
    while searching:
        old, new = cur * slot, (1 - cur) * slot
        worst = zero
        carry1, carry2 = zero, zero
        for c in range(n_chunks):
            rows, offs, mask = _tile2(pid_b, c, cols, T, D, C)
            h1 = upcast(tl.load(buf_ptr + old + offs, mask=mask, other=0.0), F64)
            h2 = upcast(tl.load(buf_ptr + old + offs + 1, mask=mask, other=0.0), F64)
            s1, s2 = _previous2(buf_ptr + old, offs, mask, rows, first1, first2, reset_ptr, pid_b, T, D, HAS_RESETS,
                                F64)  # fmt: skip
            u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
            f1, f2, j11, j12, j21, j22 = CELL(s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
            if HAS_RESETS:
                starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
                keep = ~starts[:, None] & mask
            else:
                keep = mask
            r1, r2 = tl.where(mask, f1 - h1, 0.0), tl.where(mask, f2 - h2, 0.0)
            rel = tl.maximum(tl.abs(r1) / (1.0 + tl.abs(f1)), tl.abs(r2) / (1.0 + tl.abs(f2)))
            rel = tl.where(rel == rel, rel, float("inf"))
            worst = tl.maximum(worst, tl.max(tl.where(mask, rel, 0.0), axis=0))
            # outside the sequence the identity map, so the carry passes; at a reset J = 0
            j11 = tl.where(keep, j11, tl.where(mask, 0.0, 1.0))
            j22 = tl.where(keep, j22, tl.where(mask, 0.0, 1.0))
            j12, j21 = tl.where(keep, j12, 0.0), tl.where(keep, j21, 0.0)
            a11, a12, a21, a22, d1, d2 = tl.associative_scan((j11, j12, j21, j22, r1, r2), 0, _combine2)
            d1 = d1 + a11 * carry1[None, :] + a12 * carry2[None, :]
            d2 = d2 + a21 * carry1[None, :] + a22 * carry2[None, :]
            last = (rows == c * C + C - 1)[:, None]
            carry1, carry2 = tl.sum(tl.where(last, d1, 0.0), axis=0), tl.sum(tl.where(last, d2, 0.0), axis=0)
            tl.store(buf_ptr + new + offs, (h1 + d1).to(buf_ptr.dtype.element_ty), mask=mask)
            tl.store(buf_ptr + new + offs + 1, (h2 + d2).to(buf_ptr.dtype.element_ty), mask=mask)
        residual = tl.max(tl.where(col_mask, worst, 0.0), axis=0)
        done = (residual <= tol) | (iterations >= max_iters) | (residual == float("inf"))
        searching = ~done
        iterations = tl.where(done, iterations, iterations + 1)
        cur = tl.where(done, cur, 1 - cur)
    if cur == 1:
        for c in range(n_chunks):
            rows, offs, mask = _tile2(pid_b, c, cols, T, D, C)
            tl.store(buf_ptr + offs, tl.load(buf_ptr + slot + offs, mask=mask), mask=mask)
            tl.store(buf_ptr + offs + 1, tl.load(buf_ptr + slot + offs + 1, mask=mask), mask=mask)
    out = pid_b * n_db + db
    tl.store(iters_ptr + out, iterations)
    tl.store(res_ptr + out, residual.to(res_ptr.dtype.element_ty))


@triton.jit
def _adjoint2_kernel(
    u_ptr, p_ptr, s0_ptr, reset_ptr, h_ptr, g_ptr, du_ptr, dp_ptr, ds0_ptr, T, D, n_chunks,
    CELL: tl.constexpr, CELL_VJP: tl.constexpr, G: tl.constexpr, HAS_RESETS: tl.constexpr, C: tl.constexpr,
    BLOCK_D: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    """triton_newton's _adjoint_kernel for 2-vector states: λ_t = g_t + J_{t+1}ᵀ λ_{t+1}, then the cell's VJP."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = (pid_b.to(tl.int64) * D + cols) * 2
    first1 = upcast(tl.load(s0_ptr + base, mask=col_mask, other=0.0), F64)
    first2 = upcast(tl.load(s0_ptr + base + 1, mask=col_mask, other=0.0), F64)
    zero = tl.zeros([BLOCK_D], dtype=first1.dtype)
    carry1, carry2 = zero, zero
    dp0, dp1, dp2, dp3, dp4, ds1, ds2 = zero, zero, zero, zero, zero, zero, zero
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        rows, offs, mask = _tile2(pid_b, c, cols, T, D, C)
        nxt = rows + 1
        nxt_mask = (nxt < T)[:, None] & col_mask[None, :]
        h1 = upcast(tl.load(h_ptr + offs, mask=mask, other=0.0), F64)
        h2 = upcast(tl.load(h_ptr + offs + 1, mask=mask, other=0.0), F64)
        u_next, gate_stride = _inputs(u_ptr, pid_b, nxt, cols, T, D, G)
        _, _, j11, j12, j21, j22 = CELL(h1, h2, u_next, gate_stride, nxt_mask, p_ptr, cols, col_mask, D, F64)
        keep = nxt_mask
        if HAS_RESETS:
            starts_next = tl.load(reset_ptr + pid_b.to(tl.int64) * T + nxt, mask=nxt < T, other=0) != 0
            keep = keep & ~starts_next[:, None]
        # the transposed J_{t+1} (zero past the end and at a reset there); the identity outside the sequence
        a11 = tl.where(keep, j11, tl.where(mask, 0.0, 1.0))
        a22 = tl.where(keep, j22, tl.where(mask, 0.0, 1.0))
        a12, a21 = tl.where(keep, j21, 0.0), tl.where(keep, j12, 0.0)
        g1 = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        g2 = upcast(tl.load(g_ptr + offs + 1, mask=mask, other=0.0), F64)
        m11, m12, m21, m22, l1, l2 = tl.associative_scan((a11, a12, a21, a22, g1, g2), 0, _combine2, reverse=True)
        l1 = tl.where(mask, l1 + m11 * carry1[None, :] + m12 * carry2[None, :], 0.0)
        l2 = tl.where(mask, l2 + m21 * carry1[None, :] + m22 * carry2[None, :], 0.0)
        top = (rows == c * C)[:, None]
        carry1, carry2 = tl.sum(tl.where(top, l1, 0.0), axis=0), tl.sum(tl.where(top, l2, 0.0), axis=0)
        s1, s2 = _previous2(h_ptr, offs, mask, rows, first1, first2, reset_ptr, pid_b, T, D, HAS_RESETS, F64)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        du_ptrs, _ = _inputs(du_ptr, pid_b, rows, cols, T, D, G)
        e1, e2, q0, q1, q2, q3, q4 = CELL_VJP(
            s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, l1, l2, du_ptrs, F64
        )
        dp0 += tl.sum(tl.where(mask, q0, 0.0), axis=0)
        dp1 += tl.sum(tl.where(mask, q1, 0.0), axis=0)
        dp2 += tl.sum(tl.where(mask, q2, 0.0), axis=0)
        dp3 += tl.sum(tl.where(mask, q3, 0.0), axis=0)
        dp4 += tl.sum(tl.where(mask, q4, 0.0), axis=0)
        first = (rows == 0)[:, None] & mask
        if HAS_RESETS:
            starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
            first = first & ~starts[:, None]
        ds1 += tl.sum(tl.where(first, e1, 0.0), axis=0)
        ds2 += tl.sum(tl.where(first, e2, 0.0), axis=0)
    tl.store(ds0_ptr + base, ds1.to(ds0_ptr.dtype.element_ty), mask=col_mask)
    tl.store(ds0_ptr + base + 1, ds2.to(ds0_ptr.dtype.element_ty), mask=col_mask)
    out = pid_b.to(tl.int64) * _MAX_PARAMS * D + cols
    tl.store(dp_ptr + out, dp0, mask=col_mask)
    tl.store(dp_ptr + out + D, dp1, mask=col_mask)
    tl.store(dp_ptr + out + 2 * D, dp2, mask=col_mask)
    tl.store(dp_ptr + out + 3 * D, dp3, mask=col_mask)
    tl.store(dp_ptr + out + 4 * D, dp4, mask=col_mask)


def launch_newton2(
    kernel: FusedBlock2Kernel, u: torch.Tensor, params: torch.Tensor, s0: torch.Tensor, starts: torch.Tensor | None,
    tol: float, max_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """triton_newton.launch_newton for 2-vector states: s0 [B, D, 2] → (iterate [B, T, D, 2], iterations, residual)."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    n_db = triton.cdiv(D, block_d)
    buf = torch.empty((2, B, T, D, 2), dtype=u.dtype, device=u.device)
    iters = torch.empty((B, n_db), dtype=torch.int32, device=u.device)
    res = torch.empty((B, n_db), dtype=torch.float64, device=u.device)
    _newton2_kernel[(n_db, B)](
        u, params, s0, starts if starts is not None else iters, buf, iters, res, T, D, triton.cdiv(T, C), tol,
        max_iters, CELL=kernel.value_and_jacobian, G=G, HAS_RESETS=starts is not None, C=C, BLOCK_D=block_d,
        F64=u.dtype == torch.float64,
    )  # fmt: skip
    return buf[0], iters, res


def launch_adjoint2(
    kernel: FusedBlock2Kernel, g: torch.Tensor, h: torch.Tensor, u: torch.Tensor, params: torch.Tensor,
    s0: torch.Tensor, starts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """triton_newton.launch_adjoint for 2-vector states."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    du = torch.zeros_like(u)
    dp = torch.zeros((B, MAX_PARAMS, D), dtype=torch.float64 if u.dtype == torch.float64 else torch.float32,
                     device=u.device)  # fmt: skip
    ds0 = torch.empty_like(s0)
    _adjoint2_kernel[(triton.cdiv(D, block_d), B)](
        u, params, s0, starts if starts is not None else ds0, h, g, du, dp, ds0, T, D, triton.cdiv(T, C),
        CELL=kernel.value_and_jacobian, CELL_VJP=kernel.vjp, G=G, HAS_RESETS=starts is not None, C=C,
        BLOCK_D=block_d, F64=u.dtype == torch.float64,
    )  # fmt: skip
    return du, dp.sum(0)[: params.shape[0]].to(params.dtype), ds0
