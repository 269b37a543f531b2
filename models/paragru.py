"""ParaGRU: the ParaRNN paper's GRU with diagonal recurrence (Danieli et al., 2025)."""
from __future__ import annotations

import math

import torch
from torch import nn

from unroll.kernels import diag_recurrence


def paragru_cell(h_prev: torch.Tensor, u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One ParaGRU step, for any leading shape (one timestep [B, D] or all of them [B, T, D]).

    u = Bx + b holds the three input pre-activations [..., 3, D] (z, r, c); a = (a_z, a_r, a_c) [3, D]:
        z = σ(a_z ⊙ h₋ + u_z)
        r = σ(a_r ⊙ h₋ + u_r)
        c = tanh(a_c ⊙ (r ⊙ h₋) + u_c)
        h = z ⊙ c + (1 − z) ⊙ h₋
    """
    z = torch.sigmoid(a[0] * h_prev + u[..., 0, :])
    r = torch.sigmoid(a[1] * h_prev + u[..., 1, :])
    c = torch.tanh(a[2] * (r * h_prev) + u[..., 2, :])
    return h_prev + z * (c - h_prev)


class ParaGRU(nn.Module):
    """Sequence mixer: u_t = B x_t + b, the ParaGRU recurrence over t, y_t = W_o h_t.

    Every channel of the state is its own recurrence (∂h_t/∂h_{t−1} is diagonal), which is what makes the
    Newton solve cheap and lets tensor parallelism shard channels with no communication.
    The state carried between calls (generation, chunked prefill) is h_{T−1}: [B, D], O(1) in length.
    """

    def __init__(self, d_model: int, width: int, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.width = width
        self.in_proj = nn.Linear(d_model, 3 * width)
        self.a = nn.Parameter(torch.empty(3, width))
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.init_std, self.out_std = init_std, out_std or init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.out_std)
        # Small recurrent coefficients keep the recurrence contractive (and Newton's method convergent).
        nn.init.uniform_(self.a, -0.5, 0.5)
        bias = self.in_proj.bias.view(3, self.width)
        bias.zero_()
        # "Chrono" update-gate bias: z ≈ 1/τ with time scales τ ~ U[2, 64], so channels start with a
        # spread of memory lengths instead of all forgetting half their state every token.
        tau = torch.empty(self.width).uniform_(2.0, 64.0)
        bias[0] = -torch.log(tau - 1.0)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        # The recurrence runs in at least float32 even under bf16 autocast: rounding errors compound
        # over the sequence, while the projections around it are where low precision pays.
        u = self.in_proj(x).unflatten(-1, (3, self.width))
        return u.to(torch.promote_types(u.dtype, self.a.dtype))

    def _initial(self, state: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        return state.to(u.dtype) if state is not None else u.new_zeros(u.shape[0], self.width)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x: [B, T, d_model] → (y [B, T, d_model], h_T [B, D])."""
        u = self._inputs(x)
        h0 = self._initial(state, u)
        h = diag_recurrence(paragru_cell, u, h0, (self.a,))
        last = h[:, -1] if h.shape[1] else h0
        return self.out_proj(h), last

    def step(self, x: torch.Tensor, state: torch.Tensor | None):
        """One token: x [B, d_model] → (y [B, d_model], h [B, D])."""
        u = self._inputs(x)
        h = paragru_cell(self._initial(state, u), u, self.a)
        return self.out_proj(h), h

    def extra_repr(self) -> str:
        return f"width={self.width}"


def scaled_out_std(init_std: float, n_layers: int) -> float:
    """GPT-2's residual-branch scaling: each block adds two branches to the residual stream."""
    return init_std / math.sqrt(2 * n_layers)
