"""Jacobian structure of a recurrence h_t = f(h_{t−1}, x_t): how big the state is and how ∂f/∂h_{t−1}
is represented, so that one linear_scan solves δh_t = J_t δh_{t−1} + r_t.

    "diag"         state [B, T, D],    J [B, T, D]          (elementwise cells: ParaGRU)
    ("block", k)   state [B, T, D, k], J [B, T, D, k, k]    (D independent k-vectors: ParaLSTM's [c, h])
    "dense"        state [B, T, D],    J [B, T, 1, D, D]    (any cell; the scan sees one D×D block)

Jacobians come from the cell's own `value_and_jacobian` / `jacobian(h_prev, x)` when it has one (closed
form), else from forward-mode autodiff: one jvp with a ones vector for "diag" (exact because each output
depends on its own input only), one per basis vector of the block for ("block", k) and "dense".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp

from unroll.kernels.cell import Cell, CellWithJacobian, CellWithValueAndJacobian, provides

# What the solvers' `structure` argument accepts: "diag", "dense" or ("block", k) (a list works too).
StructureSpec = str | tuple[str, int] | list[Any]


def stack_components(parts: list[torch.Tensor]) -> torch.Tensor:
    """A k-vector state (or a row of a k×k Jacobian) from its components, n [..., D] tensors, as one [..., D, n]
    whose memory holds each component whole ([n, ..., D] permuted): a ("block", k) cell that returns its state
    and Jacobian so gives the CPU scan what it reads without a copy (kernels/linear_scan.py), and each component
    is contiguous, which compiled code vectorises; interleaved (torch.stack on the last axis), every elementwise
    pass over them is strided, and ParaLSTM's compiled Newton terms ran 3× slower."""
    return torch.stack(parts).movedim(0, -1)


@dataclass(frozen=True)
class Structure:
    kind: str  # diag | block | dense
    k: int = 1

    @staticmethod
    def parse(spec: StructureSpec) -> Structure:
        if spec == "diag":
            return Structure("diag")
        if spec == "dense":
            return Structure("dense")
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "block" and int(spec[1]) >= 1:
            return Structure("block", int(spec[1]))
        raise ValueError(f"structure {spec!r}: expected 'diag', ('block', k) or 'dense'")

    def check_state(self, h0: torch.Tensor) -> None:
        if self.kind == "block" and (h0.dim() != 3 or h0.shape[-1] != self.k):
            raise ValueError(f"structure ('block', {self.k}) needs h0 of shape [B, D, {self.k}], got {tuple(h0.shape)}")
        if self.kind in ("diag", "dense") and h0.dim() != 2:
            raise ValueError(f"structure {self.kind!r} needs h0 of shape [B, D], got {tuple(h0.shape)}")

    def to_scan(self, J: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in linear_scan's layout for Jacobians J and right-hand side v [B, T, *state]."""
        if self.kind == "dense":
            return J, v.unsqueeze(2)
        return J, v

    def from_scan(self, h: torch.Tensor) -> torch.Tensor:
        return h.squeeze(2) if self.kind == "dense" else h

    def transpose(self, J: torch.Tensor) -> torch.Tensor:
        return J if self.kind == "diag" else J.transpose(-1, -2)

    def value_and_jacobian(
        self, cell: Cell, h_prev: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell(h_prev, x), ∂cell/∂h_prev) for every timestep, the Jacobian in this structure's layout.

        A cell may provide `value_and_jacobian` (closed form sharing its intermediates) or `jacobian`;
        otherwise forward-mode autodiff, whose first tangent pass also yields the value."""
        if isinstance(cell, CellWithValueAndJacobian) and provides(cell, "value_and_jacobian"):
            return cell.value_and_jacobian(h_prev, x)
        if isinstance(cell, CellWithJacobian) and provides(cell, "jacobian"):
            return cell(h_prev, x), cell.jacobian(h_prev, x)

        def tangent(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = jvp(lambda h: cell(h, x), (h_prev,), (v,))  # (value, column): has_aux is off
            return out[0], out[1]

        if self.kind == "diag":
            return tangent(torch.ones_like(h_prev))
        size = self.k if self.kind == "block" else h_prev.shape[-1]
        value, columns = h_prev, []  # value: overwritten by the first tangent (size ≥ 1)
        for i in range(size):  # column i: the response to a unit change of state component i
            e = torch.zeros_like(h_prev)
            e[..., i] = 1
            value, column = tangent(e)
            columns.append(column)
        J = torch.stack(columns, dim=-1)  # [..., row, column]
        return value, (J.unsqueeze(2) if self.kind == "dense" else J)

    def jacobian(self, cell: Cell, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(cell, CellWithJacobian) and provides(cell, "jacobian"):
            return cell.jacobian(h_prev, x)
        return self.value_and_jacobian(cell, h_prev, x)[1]
