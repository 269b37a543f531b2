"""tests/stiff_cells.py's GatedSwitch as a fused cell (Triton code for kernels/fused_newton.py), so that the fused
kernel meets a cell whose plain Newton steps blow up: h = (1 − z)·h₋ + z·switch(h₋), x [..., 2, D] = (z, s),
switch(h) = θ + s·(1 + tanh(a·(h − θ))), one parameter vector a [1, D]. Triton is imported: interpreter
tests only (tests/test_triton_newton.py sets TRITON_INTERPRET first)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stiff_cells import THETA, GatedSwitch

from unroll.kernels.triton_newton import FusedBlockKernel
from unroll.kernels.triton_scan import upcast


@triton.jit
def _switch(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, F64: tl.constexpr):
    z = upcast(tl.load(u_ptrs, mask=mask, other=0.0), F64)
    s = upcast(tl.load(u_ptrs + gate_stride, mask=mask, other=0.0), F64)
    a = upcast(tl.load(p_ptr + cols, mask=col_mask, other=0.0), F64)[None, :]
    t = 2.0 * tl.sigmoid(2.0 * a * (h - 0.5)) - 1.0  # tanh(a (h − θ)), θ = 0.5
    J = 1.0 - z + z * s * a * (1.0 - t * t)
    return z, s, a, t, J


@triton.jit
def switch_value_and_jacobian(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64: tl.constexpr):
    z, s, a, t, J = _switch(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, F64)
    return (1.0 - z) * h + z * (0.5 + s * (1.0 + t)), J


@triton.jit
def switch_vjp(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, lam, du_ptrs, F64: tl.constexpr):
    z, s, a, t, J = _switch(h, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, F64)
    out_ty = du_ptrs.dtype.element_ty
    tl.store(du_ptrs, (lam * (0.5 + s * (1.0 + t) - h)).to(out_ty), mask=mask)
    tl.store(du_ptrs + gate_stride, (lam * z * (1.0 + t)).to(out_ty), mask=mask)
    da = lam * z * s * (1.0 - t * t) * (h - 0.5)
    return lam * J, da


SWITCH = FusedBlockKernel(switch_value_and_jacobian, switch_vjp, k=1, params=1)
assert THETA == 0.5  # the Triton code's θ


class FusedGatedSwitch(GatedSwitch):
    fused_kernel = "stiff_fused_cells:SWITCH"

    def fused_params(self) -> torch.Tensor:
        return self.a.view(1, -1)

    @classmethod
    def from_fused_params(cls, params: torch.Tensor) -> FusedGatedSwitch:
        return cls(params[0])


def cases(torch_module):
    """For `unroll check kernels --cases stiff_fused_cells`: a fused solve of this cell and its adjoint, so that
    a user's own fused cell goes through Triton's compiler the way the project's do."""

    def launch() -> None:
        from unroll.kernels.fused_newton import fused_newton_solve

        g = torch_module.Generator().manual_seed(0)
        B, T, D = 1, 40, 8
        x = torch_module.rand(B, T, 2, D, generator=g, dtype=torch_module.float64).requires_grad_()
        cell = FusedGatedSwitch(torch_module.full((D,), 0.5, dtype=torch_module.float64, requires_grad=True))
        h, _ = fused_newton_solve(cell, x, torch_module.zeros(B, D, dtype=torch_module.float64))
        h.sum().backward()

    return [("stiff_fused_cells: the gated switch", launch)]
