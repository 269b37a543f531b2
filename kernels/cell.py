"""What a cell must provide to be solved by newton_solve, sequential_solve and newton_solve_seqpar.

A cell is the step function of a recurrence h_t = f(h_{t−1}, x_t), applied to every timestep at once:

    cell(h_prev, x) -> h        h_prev, h: [B, T, *state];  x: [B, T, ...] (any trailing shape)

The solvers also call it with T = 1 (the sequential loop, the fallback). It must be a pure function of
its arguments and its own parameters (tensors it closes over, whose gradients the solvers return). The
state shape and the layout of ∂f/∂h_{t−1} are fixed by the `structure` argument of the solvers, not by the
cell (kernels/structure.py):

    "diag"         state [D],    Jacobian [B, T, D]         every output depends on its own input only
    ("block", k)   state [D, k], Jacobian [B, T, D, k, k]   D independent k-vectors
    "dense"        state [D],    Jacobian [B, T, 1, D, D]

A cell may add either closed form, which the solvers then use instead of forward-mode autodiff:

    cell.value_and_jacobian(h_prev, x) -> (h, J)    one pass sharing the intermediates
    cell.jacobian(h_prev, x) -> J                   (the backward needs only J)

A plain function is a cell; so is an object with __call__ (models/paragru.py's ParaGRUCell provides all
three members). `check_cell` names what is missing or wrong before any solve starts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Cell(Protocol):
    """The required member: the step function itself."""

    def __call__(self, h_prev: torch.Tensor, x: torch.Tensor, /) -> torch.Tensor: ...


@runtime_checkable
class CellWithJacobian(Cell, Protocol):
    """A cell with a closed-form ∂f/∂h_{t−1}, in the structure's layout."""

    def jacobian(self, h_prev: torch.Tensor, x: torch.Tensor, /) -> torch.Tensor: ...


@runtime_checkable
class CellWithValueAndJacobian(Cell, Protocol):
    """A cell that returns its value and its Jacobian from one pass."""

    def value_and_jacobian(self, h_prev: torch.Tensor, x: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]: ...


# The optional members and their signatures, for the error messages.
OPTIONAL_MEMBERS = {
    "value_and_jacobian": "value_and_jacobian(h_prev, x) -> (h, J)",
    "jacobian": "jacobian(h_prev, x) -> J",
}


def provides(cell: object, name: str) -> bool:
    """Whether `cell` has the optional member `name`; one set to None counts as absent (the protocols'
    isinstance checks only that the attribute exists)."""
    return getattr(cell, name, None) is not None


def check_cell(cell: object) -> None:
    """A TypeError naming the member that makes `cell` not a Cell: __call__ missing, or an optional member
    present (not None) but not callable. The solvers call this first."""
    if not callable(cell):
        raise TypeError(
            f"cell {type(cell).__name__!r} has no __call__: a cell is called as cell(h_prev, x) -> h "
            "(see unroll.kernels.cell.Cell)"
        )
    for name, signature in OPTIONAL_MEMBERS.items():
        member = getattr(cell, name, None)
        if member is not None and not callable(member):
            raise TypeError(
                f"cell {type(cell).__name__!r}: its {name} is a {type(member).__name__}, not a method {signature}"
            )
