"""ParaGRU: the ParaRNN paper's GRU with diagonal recurrence (Danieli et al., 2025)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from unroll.models.init import Draws, Rule, init_eagerly, uniform
from unroll.models.recurrent import RecurrentMixer


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


class ParaGRUCell:
    """paragru_cell with its parameters, and its closed-form (diagonal) Jacobian:
    ∂h/∂h₋ = 1 − z + z'·(c − h₋) + z·c',  z' = z(1−z)a_z,  r' = r(1−r)a_r,  c' = (1−c²)·a_c·(r + h₋r')
    """

    def __init__(self, a: torch.Tensor):
        self.a = a

    def __call__(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return paragru_cell(h_prev, u, self.a)

    def value_and_jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_z, a_r, a_c = self.a
        z = torch.sigmoid(a_z * h_prev + u[..., 0, :])
        r = torch.sigmoid(a_r * h_prev + u[..., 1, :])
        c = torch.tanh(a_c * (r * h_prev) + u[..., 2, :])
        dz = z * (1 - z) * a_z
        dr = r * (1 - r) * a_r
        dc = (1 - c * c) * a_c * (r + h_prev * dr)
        return h_prev + z * (c - h_prev), 1 - z + dz * (c - h_prev) + z * dc

    def jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.value_and_jacobian(h_prev, u)[1]

    # the fused Newton kernel's form of this cell (kernels/fused_newton.py): its Triton code, by name (Triton is
    # imported only where the kernel runs), its parameters, and the cell rebuilt from them
    fused_kernel = "unroll.kernels.triton_cells:PARAGRU"

    def fused_params(self) -> torch.Tensor:
        return self.a

    @classmethod
    def from_fused_params(cls, params: torch.Tensor) -> ParaGRUCell:
        return cls(params)


class ParaGRU(RecurrentMixer):
    """Sequence mixer: u_t = B x_t + b (B block-diagonal over heads), the ParaGRU recurrence over t,
    y_t = W_o h_t.

    Every channel of the state is its own recurrence (∂h_t/∂h_{t−1} is diagonal), which is what makes the
    Newton solve cheap and lets tensor parallelism shard channels with no communication.
    The state carried between calls (generation, chunked prefill) is h_{T−1}: [B, D], O(1) in length.
    """

    gates, state_size = 3, 1

    def __init__(self, d_model: int, width: int, **kw: Any):
        super().__init__(d_model, width, **kw)
        self.a = nn.Parameter(torch.empty(3, width))
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        # Small recurrent coefficients (rnn_init, 0.5 by default) keep the recurrence contractive (and Newton's
        # method convergent). "Chrono" update-gate bias: z ≈ 1/τ with time scales τ ~ U[2, 64], so channels
        # start with a spread of memory lengths instead of all forgetting half their state every token.
        a = uniform(-self.rnn_init, self.rnn_init)
        return super().init_rules() | {"a": a, "in_proj.bias": chrono_bias(sign=-1.0)}

    def make_cell(self) -> ParaGRUCell:
        return ParaGRUCell(self.a)


def chrono_bias(sign: float) -> Rule:
    """The input bias [gates, width] of a ParaRNN cell: gate 0's is sign·log(τ − 1), τ ~ U[2, 64] per
    channel (sign −1: an update gate z ≈ 1/τ; +1: a forget gate f ≈ 1 − 1/τ); the other gates' are 0."""

    def values(d: Draws) -> torch.Tensor:
        tau = d.uniform(2.0, 64.0)
        return torch.where(d.coordinate(0) == 0, sign * torch.log(tau - 1.0), 0.0)

    return Rule(values, whole=True)


def scaled_out_std(init_std: float, n_layers: int) -> float:
    """GPT-2's residual-branch scaling: each block adds two branches to the residual stream."""
    return init_std / math.sqrt(2 * n_layers)
