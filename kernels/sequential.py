"""The linear-time sequential application of a recurrence: the oracle every parallel solver is checked
against, and for now the training path of the recurrent mixers."""
from __future__ import annotations

from typing import Callable

import torch

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sequential_scan(cell: Cell, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = cell(h_{t-1}, x_t) for t = 0 .. T-1, one step at a time.

    x: [B, T, ...] the per-step inputs; h0: [B, *state] the state before the first step.
    Returns h: [B, T, *state]. Differentiable by ordinary autograd through the loop. The steps' inputs
    come from one `unbind`, whose backward is one stack: slicing x[:, t] per step instead would make
    the backward quadratic in T (each slice's gradient is a full-size buffer).
    """
    if x.shape[0] != h0.shape[0]:
        raise ValueError(f"batch of x ({x.shape[0]}) and h0 ({h0.shape[0]}) differ")
    h, out = h0, []
    for x_t in x.unbind(1):
        h = cell(h, x_t)
        out.append(h)
    if not out:
        return h0.new_zeros(h0.shape[0], 0, *h0.shape[1:])
    return torch.stack(out, dim=1)
