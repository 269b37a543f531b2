"""Triton versions of the ParaRNN cells, for the fused Newton kernel (kernels/triton_newton.py gives the contract).

ParaGRU (models/paragru.py's paragru_cell, the same formula): per channel, with u = (u_z, u_r, u_c) and the
parameters a = (a_z, a_r, a_c) [3, D],
    z = σ(a_z h₋ + u_z),  r = σ(a_r h₋ + u_r),  c = tanh(a_c r h₋ + u_c),  f = h₋ + z (c − h₋)
    J = ∂f/∂h₋ = 1 − z + z(1−z) a_z (c − h₋) + z (1−c²) a_c (r + h₋ r(1−r) a_r)
and the VJP with λ: ∂f/∂u_z = z(1−z)(c − h₋), ∂f/∂u_c = z(1−c²), ∂f/∂u_r = ∂f/∂u_c · a_c h₋ r(1−r);
∂f/∂a_z = ∂f/∂u_z h₋, ∂f/∂a_r = ∂f/∂u_r h₋, ∂f/∂a_c = ∂f/∂u_c r h₋.
tanh is 2σ(2x) − 1 (Triton has no portable tanh; tests compare with torch.tanh in float64).
"""

from __future__ import annotations

import triton
import triton.language as tl

from unroll.kernels.triton_newton import FusedDiagKernel
from unroll.kernels.triton_scan import upcast

# mypy: disable-error-code="untyped-decorator,no-untyped-def"


@triton.jit
def _gru_gates(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    u_z = upcast(tl.load(u_ptrs, mask=mask, other=0.0), F64)
    u_r = upcast(tl.load(u_ptrs + gate_stride, mask=mask, other=0.0), F64)
    u_c = upcast(tl.load(u_ptrs + 2 * gate_stride, mask=mask, other=0.0), F64)
    a_z = upcast(tl.load(p_ptr + cols, mask=col_mask, other=0.0), F64)[None, :]
    a_r = upcast(tl.load(p_ptr + D + cols, mask=col_mask, other=0.0), F64)[None, :]
    a_c = upcast(tl.load(p_ptr + 2 * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    z = tl.sigmoid(a_z * h + u_z)
    r = tl.sigmoid(a_r * h + u_r)
    c = 2.0 * tl.sigmoid(2.0 * (a_c * (r * h) + u_c)) - 1.0
    return z, r, c, a_z, a_r, a_c


@triton.jit
def paragru_value_and_jacobian(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    z, r, c, a_z, a_r, a_c = _gru_gates(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
    dr = r * (1.0 - r) * a_r
    J = 1.0 - z + z * (1.0 - z) * a_z * (c - h) + z * (1.0 - c * c) * a_c * (r + h * dr)
    return h + z * (c - h), J


@triton.jit
def paragru_vjp(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, lam, du_ptrs, F64: tl.constexpr):
    z, r, c, a_z, a_r, a_c = _gru_gates(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
    dr = r * (1.0 - r) * a_r
    J = 1.0 - z + z * (1.0 - z) * a_z * (c - h) + z * (1.0 - c * c) * a_c * (r + h * dr)
    du_z = lam * z * (1.0 - z) * (c - h)
    du_c = lam * z * (1.0 - c * c)
    du_r = du_c * a_c * h * r * (1.0 - r)
    out_ty = du_ptrs.dtype.element_ty
    tl.store(du_ptrs, du_z.to(out_ty), mask=mask)
    tl.store(du_ptrs + gate_stride, du_r.to(out_ty), mask=mask)
    tl.store(du_ptrs + 2 * gate_stride, du_c.to(out_ty), mask=mask)
    return lam * J, du_z * h, du_r * h, du_c * r * h


PARAGRU = FusedDiagKernel(paragru_value_and_jacobian, paragru_vjp)  # parameters a = (a_z, a_r, a_c) [3, D]
