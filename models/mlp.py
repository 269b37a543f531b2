"""SwiGLU MLP (Shazeer, 2020): y = W_down (SiLU(W_gate x) ⊙ W_up x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unroll.models.init import Rule, init_eagerly, normal


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up fused: one matmul
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.init_std, self.out_std = init_std, out_std or init_std
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        return {"gate_up.weight": normal(self.init_std), "down.weight": normal(self.out_std)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        y: torch.Tensor = self.down(F.silu(gate) * up)
        return y
