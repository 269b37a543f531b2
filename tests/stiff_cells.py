"""Stiff cells on which plain Newton fails and damped Newton (kernels/newton_damping.py) does not, for
tests/test_newton_damping.py and tests/seqpar_worker.py.

Both are ParaRNN-shaped (a ParaGRU-like update gate; a ParaLSTM-like forget-gated cell state with an output
gate) around a "switch" nonlinearity, switch(h) = θ + s·(1 + tanh(a·(h − θ))): its lower branch is θ itself,
where its slope is a·s ≫ 1. So Newton's first guess f(0, x) lands on the steep point at every step, and
|∂f/∂h| ≈ a·s over the whole sequence: the first Newton step grows like (a·s)^T and blows up. The solution
sits on the upper branch, θ + 2s, where the slope is ≈ 0: it is contractive, with a short memory.
"""

from __future__ import annotations

import torch

THETA = 0.5


def switch(h: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return THETA + s * (1 + torch.tanh(a * (h - THETA)))


class GatedSwitch:
    """Diagonal: h = (1 − z)·h₋ + z·switch(h₋), x [..., 2, D] = (z, s); the parameter a is a tensor."""

    def __init__(self, a: torch.Tensor):
        self.a = a

    def __call__(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z, s = x[..., 0, :], x[..., 1, :]
        return (1 - z) * h + z * switch(h, s, self.a)


class ForgetGatedSwitch:
    """2×2 blocks, state [..., D, 2] = (c, h): c = f·c₋ + (1 − f)·switch(h₋), h = o·c;
    x [..., 3, D] = (f, o, s); the parameter a is a tensor."""

    def __init__(self, a: torch.Tensor):
        self.a = a

    def __call__(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c, h = state[..., 0], state[..., 1]
        f, o, s = x[..., 0, :], x[..., 1, :], x[..., 2, :]
        c = f * c + (1 - f) * switch(h, s, self.a)
        return torch.stack([c, o * c], dim=-1)


def stiff_problem(structure: str, T: int, seed: int, a: float = 10.0, B: int = 3, D: int = 4, reset_rate=0.01):
    """(cell, x, h0, resets, structure spec) in float64: "diag" (GatedSwitch) or "block" (ForgetGatedSwitch,
    ("block", 2)); update gates z in [0.9, 1], forget gates f in [0, 0.1], output gates o in [0.9, 1],
    branch heights s in [1, 2], h0 ~ N(0, 1), resets at random (reset_rate) and at T // 2 in sequence 0.
    The cell's parameter is cell.a, a float64 scalar tensor."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(a, dtype=torch.float64)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(B, T, D, generator=g, dtype=torch.float64)

    if structure == "diag":
        cell, spec, x = GatedSwitch(a), "diag", torch.stack([uniform(0.9, 1.0), uniform(1.0, 2.0)], dim=2)
        h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    else:
        x = torch.stack([uniform(0.0, 0.1), uniform(0.9, 1.0), uniform(1.0, 2.0)], dim=2)
        cell, spec, h0 = ForgetGatedSwitch(a), ("block", 2), torch.randn(B, D, 2, generator=g, dtype=torch.float64)
    resets = torch.rand(B, T, generator=g) < reset_rate
    resets[0, T // 2] = True
    return cell, x, h0, resets, spec
