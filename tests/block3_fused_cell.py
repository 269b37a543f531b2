"""A 3×3-block cell written outside the project, fused (Triton code for kernels/fused_newton.py's k×k kernels):
per channel d a 3-vector state s and its own 3×3 matrix M_d, f(s, u) = tanh(M_d s + u), u [..., 3, D] the
three inputs; ∂f/∂s = diag(1 − f²) M_d, so the channel's Jacobian is a full 3×3 block (a rotation-like M_d
mixes the components, as a cell tracking a 3-cycle would need). Parameters: M [9, D], row-major (M_d[i, j] at
row 3i + j). Triton is imported: interpreter tests only (tests/test_triton_newton.py), and `unroll check kernels
--cases block3_fused_cell`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unroll.kernels.triton_newton import FusedBlockKernel
from unroll.kernels.triton_scan import upcast


class Rotor3:
    """The PyTorch cell: state [..., D, 3], x [..., 3, D]; M [9, D] a tensor (its gradient is the solvers')."""

    fused_kernel = "block3_fused_cell:ROTOR3"

    def __init__(self, M: torch.Tensor):
        self.M = M

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        M = self.M.view(3, 3, -1).permute(2, 0, 1)  # [D, 3, 3]
        return torch.tanh(torch.einsum("dij,...dj->...di", M, s) + x.transpose(-1, -2))

    def fused_params(self) -> torch.Tensor:
        return self.M

    @classmethod
    def from_fused_params(cls, params: torch.Tensor) -> Rotor3:
        return cls(params)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _row(s0, s1, s2, u_ptrs, gate_stride, i: tl.constexpr, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    """Row i of the cell: (f_i, M_i0, M_i1, M_i2)."""
    m0 = upcast(tl.load(p_ptr + (3 * i) * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    m1 = upcast(tl.load(p_ptr + (3 * i + 1) * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    m2 = upcast(tl.load(p_ptr + (3 * i + 2) * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    u = upcast(tl.load(u_ptrs + i * gate_stride, mask=mask, other=0.0), F64)
    return _tanh(m0 * s0 + m1 * s1 + m2 * s2 + u), m0, m1, m2


@triton.jit
def rotor3_value_and_jacobian(s0, s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    f0, m00, m01, m02 = _row(s0, s1, s2, u_ptrs, gate_stride, 0, mask, p_ptr, cols, col_mask, D, F64)
    f1, m10, m11, m12 = _row(s0, s1, s2, u_ptrs, gate_stride, 1, mask, p_ptr, cols, col_mask, D, F64)
    f2, m20, m21, m22 = _row(s0, s1, s2, u_ptrs, gate_stride, 2, mask, p_ptr, cols, col_mask, D, F64)
    d0, d1, d2 = 1.0 - f0 * f0, 1.0 - f1 * f1, 1.0 - f2 * f2
    return f0, f1, f2, d0 * m00, d0 * m01, d0 * m02, d1 * m10, d1 * m11, d1 * m12, d2 * m20, d2 * m21, d2 * m22


@triton.jit
def rotor3_vjp(s0, s1, s2, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, l0, l1, l2, du_ptrs, F64: tl.constexpr):
    f0, m00, m01, m02 = _row(s0, s1, s2, u_ptrs, gate_stride, 0, mask, p_ptr, cols, col_mask, D, F64)
    f1, m10, m11, m12 = _row(s0, s1, s2, u_ptrs, gate_stride, 1, mask, p_ptr, cols, col_mask, D, F64)
    f2, m20, m21, m22 = _row(s0, s1, s2, u_ptrs, gate_stride, 2, mask, p_ptr, cols, col_mask, D, F64)
    g0, g1, g2 = l0 * (1.0 - f0 * f0), l1 * (1.0 - f1 * f1), l2 * (1.0 - f2 * f2)  # ∂L/∂ of the pre-activations
    out_ty = du_ptrs.dtype.element_ty
    tl.store(du_ptrs, g0.to(out_ty), mask=mask)
    tl.store(du_ptrs + gate_stride, g1.to(out_ty), mask=mask)
    tl.store(du_ptrs + 2 * gate_stride, g2.to(out_ty), mask=mask)
    return (
        m00 * g0 + m10 * g1 + m20 * g2,
        m01 * g0 + m11 * g1 + m21 * g2,
        m02 * g0 + m12 * g1 + m22 * g2,
        g0 * s0, g0 * s1, g0 * s2, g1 * s0, g1 * s1, g1 * s2, g2 * s0, g2 * s1, g2 * s2,
    )  # fmt: skip


ROTOR3 = FusedBlockKernel(rotor3_value_and_jacobian, rotor3_vjp, k=3, params=9)


def problem(B: int, T: int, D: int, seed: int, scale: float = 0.6, reset_rate: float = 0.1, device: str = "cpu"):
    """(cell, u [B, T, 3, D], s0 [B, D, 3], resets, M) in float64 on `device`, u, s0 and M requiring grad; M's
    entries uniform in ±scale (a contraction at 0.6·3 < 2 only on average: the solves take several iterations)."""
    g = torch.Generator().manual_seed(seed)
    M = ((torch.rand(9, D, generator=g, dtype=torch.float64) - 0.5) * 2 * scale).to(device).requires_grad_()
    u = torch.randn(B, T, 3, D, generator=g, dtype=torch.float64).to(device).requires_grad_()
    s0 = torch.randn(B, D, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    resets = (torch.rand(B, T, generator=g) < reset_rate).to(device)
    return Rotor3(M), u, s0, resets, M


def cases(torch_module):
    """For `unroll check kernels --cases block3_fused_cell`: a fused solve of this cell and its adjoint, in
    float32 and float64, at the production tiles (64-step chunks, 32 channels)."""

    def launch(dtype) -> None:
        from unroll.kernels.fused_newton import fused_newton_solve

        cell, u, s0, resets, M = problem(1, 70, 32, seed=0)
        with torch_module.no_grad():
            cell.M = M.to(dtype).requires_grad_()
            u, s0 = u.to(dtype).requires_grad_(), s0.to(dtype).requires_grad_()
        h, _ = fused_newton_solve(cell, u, s0, resets=resets)
        h.sum().backward()

    return [(f"block3_fused_cell {d}", lambda d=d: launch(d)) for d in (torch_module.float32, torch_module.float64)]
