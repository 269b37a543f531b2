"""Triton versions of the ParaRNN cells, for the fused Newton kernels (kernels/triton_newton.py gives the
contract).

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

from unroll.kernels.triton_newton import FusedBlockKernel
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


# a diagonal cell (1×1 blocks), parameters a = (a_z, a_r, a_c) [3, D]
PARAGRU = FusedBlockKernel(paragru_value_and_jacobian, paragru_vjp, k=1, params=3)


# ParaLSTM (models/paralstm.py's paralstm_cell): the state per channel is (c, h); u = (u_f, u_c̃, u_o), the
# parameters (a_f, a_c, a_o, p_f, p_o) [5, D]:
#     f = σ(a_f h₋ + u_f + p_f c₋), c̃ = tanh(a_c h₋ + u_c), c = f c₋ + (1 − f) c̃, o = σ(a_o h₋ + u_o + p_o c),
#     h = o tanh(c)
# its 2×2 Jacobian as ParaLSTMCell.value_and_jacobian writes it, and the VJP by the chain rule backwards through
# those five lines (each pre-activation's gradient is its input's; a parameter's is that times what it scales).


@triton.jit
def _lstm_forward(c_prev, h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    u_f = upcast(tl.load(u_ptrs, mask=mask, other=0.0), F64)
    u_c = upcast(tl.load(u_ptrs + gate_stride, mask=mask, other=0.0), F64)
    u_o = upcast(tl.load(u_ptrs + 2 * gate_stride, mask=mask, other=0.0), F64)
    a_f = upcast(tl.load(p_ptr + cols, mask=col_mask, other=0.0), F64)[None, :]
    a_c = upcast(tl.load(p_ptr + D + cols, mask=col_mask, other=0.0), F64)[None, :]
    a_o = upcast(tl.load(p_ptr + 2 * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    p_f = upcast(tl.load(p_ptr + 3 * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    p_o = upcast(tl.load(p_ptr + 4 * D + cols, mask=col_mask, other=0.0), F64)[None, :]
    f = tl.sigmoid(a_f * h_prev + u_f + p_f * c_prev)
    c_tilde = 2.0 * tl.sigmoid(2.0 * (a_c * h_prev + u_c)) - 1.0
    c = f * c_prev + (1.0 - f) * c_tilde
    o = tl.sigmoid(a_o * h_prev + u_o + p_o * c)
    tc = 2.0 * tl.sigmoid(2.0 * c) - 1.0
    return f, c_tilde, c, o, tc, a_f, a_c, a_o, p_f, p_o


@triton.jit
def paralstm_value_and_jacobian(c_prev, h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    f, c_tilde, c, o, tc, a_f, a_c, a_o, p_f, p_o = _lstm_forward(
        c_prev, h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64
    )
    df = f * (1.0 - f)
    dc_dc = f + (c_prev - c_tilde) * df * p_f
    dc_dh = (c_prev - c_tilde) * df * a_f + (1.0 - f) * (1.0 - c_tilde * c_tilde) * a_c
    do = o * (1.0 - o)
    dtc = o * (1.0 - tc * tc)
    dh_dc = do * p_o * dc_dc * tc + dtc * dc_dc
    dh_dh = do * (a_o + p_o * dc_dh) * tc + dtc * dc_dh
    return c, o * tc, dc_dc, dc_dh, dh_dc, dh_dh


@triton.jit
def paralstm_vjp(
    c_prev, h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, l_c, l_h, du_ptrs, F64: tl.constexpr
):
    f, c_tilde, c, o, tc, a_f, a_c, a_o, p_f, p_o = _lstm_forward(
        c_prev, h_prev, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64
    )
    g_o = l_h * tc * o * (1.0 - o)  # the output gate's pre-activation
    g_c = l_c + l_h * o * (1.0 - tc * tc) + g_o * p_o  # c, through h and o too
    g_f = g_c * (c_prev - c_tilde) * f * (1.0 - f)
    g_ct = g_c * (1.0 - f) * (1.0 - c_tilde * c_tilde)
    out_ty = du_ptrs.dtype.element_ty
    tl.store(du_ptrs, g_f.to(out_ty), mask=mask)
    tl.store(du_ptrs + gate_stride, g_ct.to(out_ty), mask=mask)
    tl.store(du_ptrs + 2 * gate_stride, g_o.to(out_ty), mask=mask)
    d_c_prev = g_c * f + g_f * p_f
    d_h_prev = g_f * a_f + g_ct * a_c + g_o * a_o
    return d_c_prev, d_h_prev, g_f * h_prev, g_ct * h_prev, g_o * h_prev, g_f * c_prev, g_o * c


# 2×2 blocks (c, h), parameters (a_f, a_c, a_o, p_f, p_o) [5, D]
PARALSTM = FusedBlockKernel(paralstm_value_and_jacobian, paralstm_vjp, k=2, params=5)
