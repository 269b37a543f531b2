"""Triton kernels of the fused Newton solve (kernels/fused_newton.py): the whole Newton solve of a diagonal
recurrence in one launch (`launch_newton`), and its adjoint backward in another (`launch_adjoint`).

  - One program per (sequence b, block of BLOCK_D channels). A diagonal cell's channels are independent
    recurrences, so a program's Newton iterations need nothing from any other program: it decides its own
    convergence, on the device, and iterates until its channels converge or `max_iters`.
  - An iteration is one sweep over the sequence in chunks of C steps: per chunk, f and J at the current
    iterate's h_{t−1} (the cell's Triton function), the residual max_t |f − h| / (1 + |f|) accumulated, and
    the correction δ_t = J_t δ_{t−1} + (f_t − h_t) by one associative scan of the chunk carried from the
    chunk before (the same decomposition as triton_scan's). The sweep is sequential over T/C chunks inside a
    program, as Mamba's selective-scan kernel is: with B·D/BLOCK_D programs the GPU is full in training.
  - Two iterate buffers alternate (the correction is computed from the old iterate while the new one is
    written), so the returned iterate is exactly the one whose residual was measured, as in newton.py: a
    program that converges returns the iterate before the (discarded) last correction.
  - The first guess is f(0, x) (h0 at t = 0), as in newton.py; resets zero h_{t−1} and J_t where a
    document starts.
  - Each program writes its iterations and its residual.

The adjoint is one reverse sweep per program: λ_t = g_t + J_{t+1} λ_{t+1} by reverse associative scans over
chunks (J_{t+1} from h*_t and x_{t+1}), and in the same pass the cell's VJP with λ: ∂L/∂x_t, the per-channel
parameters' gradients (summed over the program's steps; the host sums the programs) and ∂L/∂h0.

A cell's Triton code (`FusedDiagKernel`; ParaGRU's in kernels/triton_cells.py) is two @triton.jit functions
over [C, BLOCK_D] tiles:
    value_and_jacobian(h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64) -> (f, J)
    vjp(h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, lam, du_ptrs, F64) -> (dh_prev, dp0, dp1, dp2)
where u_ptrs point at gate 0 of the tile's inputs (gate g at + g·gate_stride), p_ptr at the parameters
([P, D] row-major, P ≤ MAX_PARAMS: parameter i of channel d at i·D + d), and vjp stores λ·∂f/∂u into du_ptrs
(the same layout) and returns λ·∂f/∂h_prev and the parameters' λ·∂f/∂p per element (zeros for parameters
the cell does not have). Float64 problems compute in float64, others in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from unroll.kernels.triton_scan import _combine, upcast

# mypy: disable-error-code="untyped-decorator,no-untyped-def"

MAX_PARAMS = 3  # per-channel parameter vectors a fused cell may have (the vjp returns this many)


@dataclass(frozen=True)
class FusedDiagKernel:
    """A diagonal cell's Triton code (the module docstring gives the contract)."""

    value_and_jacobian: Any  # a @triton.jit function
    vjp: Any  # a @triton.jit function


@triton.jit
def _tile(pid_b, c, cols, T, D, C: tl.constexpr):
    """Rows (steps) of chunk c, their [C, BLOCK_D] offsets into a [B, T, D] tensor and the tile's mask."""
    rows = c * C + tl.arange(0, C)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    offs = (pid_b.to(tl.int64) * T + rows[:, None]) * D + cols[None, :]
    return rows, offs, mask


@triton.jit
def _inputs(u_ptr, pid_b, rows, cols, T, D, G: tl.constexpr):
    """Pointers to gate 0 of the inputs u [B, T, G, D] at the tile's rows and columns, and the gate stride."""
    return u_ptr + ((pid_b.to(tl.int64) * T + rows[:, None]) * G) * D + cols[None, :], D


@triton.jit
def _newton_kernel(
    u_ptr,
    p_ptr,
    h0_ptr,
    reset_ptr,
    buf_ptr,
    iters_ptr,
    res_ptr,
    T,
    D,
    n_chunks,
    tol,
    max_iters,
    CELL: tl.constexpr,
    G: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F64: tl.constexpr,
):
    """Program (channel block db, sequence b): Newton to convergence in buf[0] or buf[1] ([2, B, T, D]), the
    answer left in buf[0]; iterations and residual into [B, n_db]."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.num_programs(0)
    B = tl.num_programs(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    h0 = upcast(tl.load(h0_ptr + pid_b.to(tl.int64) * D + cols, mask=col_mask, other=0.0), F64)
    slot = B.to(tl.int64) * T * D  # elements of one iterate buffer

    # the first guess f(0, x), h0 at t = 0, into buf[0]
    for c in range(n_chunks):
        rows, offs, mask = _tile(pid_b, c, cols, T, D, C)
        prev = tl.where((rows == 0)[:, None], h0[None, :], 0.0)
        if HAS_RESETS:
            starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
            prev = tl.where(starts[:, None], 0.0, prev)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        f, _ = CELL(prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
        tl.store(buf_ptr + offs, f.to(buf_ptr.dtype.element_ty), mask=mask)

    # loop-carried scalars as tensors from the start, updated without branches (one type throughout the loop)
    cur = pid_b * 0  # the buffer holding the current iterate
    iterations = pid_b * 0
    residual = tl.max(tl.full([BLOCK_D], float("inf"), h0.dtype), axis=0)
    searching = pid_b == pid_b
    while searching:
        old, new = cur * slot, (1 - cur) * slot
        worst = tl.zeros([BLOCK_D], dtype=h0.dtype)
        carry = tl.zeros([BLOCK_D], dtype=h0.dtype)  # δ before the chunk (δ_{−1} = 0: h0 is given)
        for c in range(n_chunks):
            rows, offs, mask = _tile(pid_b, c, cols, T, D, C)
            h = upcast(tl.load(buf_ptr + old + offs, mask=mask, other=0.0), F64)
            # h_{t−1} of the current iterate: the buffer is only written in the other slot, so t − 1 is there
            prev = upcast(tl.load(buf_ptr + old + offs - D, mask=mask & (rows > 0)[:, None], other=0.0), F64)
            prev = tl.where((rows == 0)[:, None], h0[None, :], prev)
            if HAS_RESETS:
                starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
                prev = tl.where(starts[:, None], 0.0, prev)
            u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
            f, J = CELL(prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
            if HAS_RESETS:
                J = tl.where(starts[:, None], 0.0, J)
            r = tl.where(mask, f - h, 0.0)
            rel = tl.abs(r) / (1.0 + tl.abs(f))
            rel = tl.where(rel == rel, rel, float("inf"))  # NaN: not converged (newton.py's residual: inf)
            worst = tl.maximum(worst, tl.max(tl.where(mask, rel, 0.0), axis=0))
            A, H = tl.associative_scan((tl.where(mask, J, 1.0), r), 0, _combine)
            delta = H + A * carry[None, :]
            carry = tl.sum(tl.where((rows == c * C + C - 1)[:, None], delta, 0.0), axis=0)
            tl.store(buf_ptr + new + offs, (h + delta).to(buf_ptr.dtype.element_ty), mask=mask)
        residual = tl.max(tl.where(col_mask, worst, 0.0), axis=0)
        done = (residual <= tol) | (iterations >= max_iters) | (residual == float("inf"))  # inf: overflowed
        searching = ~done
        iterations = tl.where(done, iterations, iterations + 1)
        cur = tl.where(done, cur, 1 - cur)
    if cur == 1:  # the answer into buf[0]
        for c in range(n_chunks):
            rows, offs, mask = _tile(pid_b, c, cols, T, D, C)
            tl.store(buf_ptr + offs, tl.load(buf_ptr + slot + offs, mask=mask), mask=mask)
    out = pid_b * n_db + db
    tl.store(iters_ptr + out, iterations)
    tl.store(res_ptr + out, residual.to(res_ptr.dtype.element_ty))


@triton.jit
def _adjoint_kernel(
    u_ptr,
    p_ptr,
    h0_ptr,
    reset_ptr,
    h_ptr,
    g_ptr,
    du_ptr,
    dp_ptr,
    dh0_ptr,
    T,
    D,
    n_chunks,
    CELL: tl.constexpr,
    CELL_VJP: tl.constexpr,
    G: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F64: tl.constexpr,
):
    """Program (channel block db, sequence b): λ by a reverse sweep, with ∂L/∂u into du [B, T, G, D], the
    parameters' gradients summed over the steps into dp [B, MAX_PARAMS, D], ∂L/∂h0 into dh0 [B, D]."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    h0 = upcast(tl.load(h0_ptr + pid_b.to(tl.int64) * D + cols, mask=col_mask, other=0.0), F64)
    carry = tl.zeros([BLOCK_D], dtype=h0.dtype)  # λ after the chunk (λ_T = 0)
    dp0 = tl.zeros([BLOCK_D], dtype=h0.dtype)
    dp1 = tl.zeros([BLOCK_D], dtype=h0.dtype)
    dp2 = tl.zeros([BLOCK_D], dtype=h0.dtype)
    dh0 = tl.zeros([BLOCK_D], dtype=h0.dtype)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        rows, offs, mask = _tile(pid_b, c, cols, T, D, C)
        # J_{t+1}: the cell at (h*_t, x_{t+1}), zero past the end and where a document starts at t + 1
        nxt = rows + 1
        nxt_mask = (nxt < T)[:, None] & col_mask[None, :]
        h = upcast(tl.load(h_ptr + offs, mask=mask, other=0.0), F64)
        u_next, gate_stride = _inputs(u_ptr, pid_b, nxt, cols, T, D, G)
        _, J_next = CELL(h, u_next, gate_stride, nxt_mask, p_ptr, cols, col_mask, D, F64)
        J_next = tl.where(nxt_mask, J_next, 0.0)
        if HAS_RESETS:
            starts_next = tl.load(reset_ptr + pid_b.to(tl.int64) * T + nxt, mask=nxt < T, other=0) != 0
            J_next = tl.where(starts_next[:, None], 0.0, J_next)
        g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        A, L = tl.associative_scan((tl.where(mask, J_next, 1.0), g), 0, _combine, reverse=True)
        lam = tl.where(mask, L + A * carry[None, :], 0.0)
        carry = tl.sum(tl.where((rows == c * C)[:, None], lam, 0.0), axis=0)
        # the cell's VJP with λ at (h*_{t−1}, x_t)
        prev = upcast(tl.load(h_ptr + offs - D, mask=mask & (rows > 0)[:, None], other=0.0), F64)
        prev = tl.where((rows == 0)[:, None], h0[None, :], prev)
        if HAS_RESETS:
            starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
            prev = tl.where(starts[:, None], 0.0, prev)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        du_ptrs, _ = _inputs(du_ptr, pid_b, rows, cols, T, D, G)
        dprev, e0, e1, e2 = CELL_VJP(prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, lam, du_ptrs, F64)
        dp0 += tl.sum(tl.where(mask, e0, 0.0), axis=0)
        dp1 += tl.sum(tl.where(mask, e1, 0.0), axis=0)
        dp2 += tl.sum(tl.where(mask, e2, 0.0), axis=0)
        first = (rows == 0)[:, None] & mask
        if HAS_RESETS:
            first = first & ~starts[:, None]
        dh0 += tl.sum(tl.where(first, dprev, 0.0), axis=0)
    base = pid_b.to(tl.int64) * D
    tl.store(dh0_ptr + base + cols, dh0.to(dh0_ptr.dtype.element_ty), mask=col_mask)
    base = pid_b.to(tl.int64) * 3 * D
    tl.store(dp_ptr + base + cols, dp0, mask=col_mask)
    tl.store(dp_ptr + base + D + cols, dp1, mask=col_mask)
    tl.store(dp_ptr + base + 2 * D + cols, dp2, mask=col_mask)


def _launch(T: int, D: int) -> tuple[int, int]:
    """(C, BLOCK_D): chunk rows and channels per program (powers of two; untuned on GPUs)."""
    C = min(64, triton.next_power_of_2(max(T, 1)))
    return C, min(triton.next_power_of_2(D), 32)


def launch_newton(
    kernel: FusedDiagKernel,
    u: torch.Tensor,
    params: torch.Tensor,
    h0: torch.Tensor,
    starts: torch.Tensor | None,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Newton kernel on contiguous u [B, T, G, D], params [P, D], h0 [B, D], starts uint8 [B, T] or None:
    (the last iterate [B, T, D], iterations int32 [B, n_db], residual float64 [B, n_db]) per program."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    n_db = triton.cdiv(D, block_d)
    buf = torch.empty((2, B, T, D), dtype=u.dtype, device=u.device)
    iters = torch.empty((B, n_db), dtype=torch.int32, device=u.device)
    res = torch.empty((B, n_db), dtype=torch.float64, device=u.device)
    _newton_kernel[(n_db, B)](
        u, params, h0, starts if starts is not None else iters, buf, iters, res, T, D, triton.cdiv(T, C), tol,
        max_iters, CELL=kernel.value_and_jacobian, G=G, HAS_RESETS=starts is not None, C=C, BLOCK_D=block_d,
        F64=u.dtype == torch.float64,
    )  # fmt: skip
    return buf[0], iters, res


def launch_adjoint(
    kernel: FusedDiagKernel,
    g: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    params: torch.Tensor,
    h0: torch.Tensor,
    starts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adjoint kernel: (∂L/∂u, ∂L/∂params, ∂L/∂h0) from g = ∂L/∂h at the solution h (all contiguous)."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    du = torch.zeros_like(u)
    dp = torch.zeros((B, MAX_PARAMS, D), dtype=torch.float64 if u.dtype == torch.float64 else torch.float32,
                     device=u.device)  # fmt: skip
    dh0 = torch.empty_like(h0)
    _adjoint_kernel[(triton.cdiv(D, block_d), B)](
        u, params, h0, starts if starts is not None else dh0, h, g, du, dp, dh0, T, D, triton.cdiv(T, C),
        CELL=kernel.value_and_jacobian, CELL_VJP=kernel.vjp, G=G, HAS_RESETS=starts is not None, C=C,
        BLOCK_D=block_d, F64=u.dtype == torch.float64,
    )  # fmt: skip
    return du, dp.sum(0)[: params.shape[0]].to(params.dtype), dh0
