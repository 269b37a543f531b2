"""A nonlinear recurrence with a diagonal Jacobian, solved step by step forward and differentiated by the
adjoint (one reverse linear recurrence), instead of autograd through the time loop.

Forward: h_t = cell(h_{t−1}, u_t, *params), sequential, no graph recorded.
Backward: with J_t = ∂h_t/∂h_{t−1} (diagonal, so a [B, T, D] tensor) and g_t = ∂L/∂h_t,
    λ_{T−1} = g_{T−1},   λ_t = g_t + J_{t+1} ⊙ λ_{t+1}            (the adjoint, a reverse linear scan)
    ∂L/∂u_t, ∂L/∂params = vjp of cell at (h_{t−1}, u_t) with λ_t, for all t in one batched call
    ∂L/∂h0 = J_0 ⊙ λ_0
The cell is re-applied to all timesteps at once in the backward (it is elementwise in time given the
stored states), so the per-timestep Python work is one fused multiply-add instead of a graph of a dozen
autograd nodes. Exact: the gradient of the sequential solution, not an approximation.
"""
from __future__ import annotations

from typing import Callable

import torch

DiagCell = Callable[..., torch.Tensor]  # cell(h_prev, u, *params) -> h, elementwise over the state


class _DiagRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell: DiagCell, u: torch.Tensor, h0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        h = h0.new_empty(h0.shape[0], u.shape[1], *h0.shape[1:])
        state = h0
        for t in range(u.shape[1]):
            state = cell(state, u[:, t], *params)
            h[:, t] = state
        ctx.cell = cell
        ctx.save_for_backward(u, h0, h, *params)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        u, h0, h, *params = ctx.saved_tensors
        with torch.enable_grad():
            h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1).detach().requires_grad_()
            u_ = u.detach().requires_grad_(u.requires_grad)
            params_ = [p.detach().requires_grad_(p.requires_grad) for p in params]
            out = ctx.cell(h_prev, u_, *params_)
            # Diagonal Jacobian: the vjp with ones gives its diagonal (each output depends on one h_prev).
            (jac,) = torch.autograd.grad(out, h_prev, torch.ones_like(out), retain_graph=True)
        lam = grad_h.contiguous().clone()
        for t in range(u.shape[1] - 2, -1, -1):
            lam[:, t].addcmul_(jac[:, t + 1], lam[:, t + 1])
        wanted = [x for x in (u_, *params_) if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, lam) if wanted else ())
        grad_u = next(grads) if u_.requires_grad else None
        grad_params = [next(grads) if p.requires_grad else None for p in params_]
        grad_h0 = jac[:, 0] * lam[:, 0] if ctx.needs_input_grad[2] else None
        return (None, grad_u, grad_h0, *grad_params)


def diag_recurrence(cell: DiagCell, u: torch.Tensor, h0: torch.Tensor, params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """h: [B, T, *state] with h_t = cell(h_{t−1}, u_t, *params); u: [B, T, ...], h0: [B, *state].

    The cell must be elementwise over the state (∂h_t/∂h_{t−1} diagonal), e.g. ParaGRU; for any other
    cell use `sequential_scan`. Gradients flow to u, h0 and params by the adjoint (see module docstring).
    """
    if u.shape[1] == 0:
        return h0.new_zeros(h0.shape[0], 0, *h0.shape[1:])
    return _DiagRecurrence.apply(cell, u, h0, *params)
