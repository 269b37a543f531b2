"""The cell contract (kernels/cell.py): a user-written cell that follows it is solved by every solver, in
float64 parallel equals sequential; a cell that breaks it is refused with its member named."""

import pytest
import torch

from unroll.kernels import Cell, newton_solve, sequential_solve
from unroll.kernels.cell import CellWithJacobian, CellWithValueAndJacobian, check_cell
from unroll.kernels.newton import sequential_loop
from unroll.kernels.structure import Structure


class DampedTanhCell:
    """A user's own diagonal cell h = tanh(w ⊙ h₋ + x) with its closed-form Jacobian w ⊙ (1 − h²)."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.calls = {"value_and_jacobian": 0, "jacobian": 0}

    def __call__(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w * h_prev + x)

    def value_and_jacobian(self, h_prev: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["value_and_jacobian"] += 1
        h = self(h_prev, x)
        return h, self.w * (1 - h * h)

    def jacobian(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls["jacobian"] += 1
        return self.value_and_jacobian(h_prev, x)[1]


class RotatingCell:
    """A 2×2-block cell without any closed form (the solvers take its Jacobian by autodiff)."""

    def __init__(self, angle: torch.Tensor):
        self.angle = angle

    def __call__(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(self.angle), torch.sin(self.angle)
        rotated = torch.stack([c * h_prev[..., 0] - s * h_prev[..., 1], s * h_prev[..., 0] + c * h_prev[..., 1]], -1)
        return torch.tanh(0.8 * rotated + x)


def problem(state: tuple[int, ...], seed: int, T: int = 300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, T, *state, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, *state, generator=g, dtype=torch.float64)
    return x, h0


def test_the_protocols_recognise_what_a_cell_provides():
    cell = DampedTanhCell(torch.full((4,), 0.5, dtype=torch.float64))
    assert isinstance(cell, Cell) and isinstance(cell, CellWithJacobian) and isinstance(cell, CellWithValueAndJacobian)
    plain = RotatingCell(torch.tensor(0.3))
    assert isinstance(plain, Cell) and not isinstance(plain, CellWithJacobian)
    assert not isinstance(plain, CellWithValueAndJacobian)
    assert not isinstance(object(), Cell)


@pytest.mark.parametrize("solve", [newton_solve, sequential_solve], ids=["newton", "sequential"])
def test_a_user_cell_with_closed_forms_is_solved_exactly_and_its_jacobian_is_used(solve):
    w = (torch.rand(4, dtype=torch.float64) - 0.5).requires_grad_()
    cell = DampedTanhCell(w)
    x, h0 = problem((4,), seed=1)
    x.requires_grad_()
    h, info = solve(cell, x, h0, structure="diag")
    with torch.no_grad():
        ref = sequential_loop(cell, x, h0, None)
    assert info.converged and info.fallback is None
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    # the gradient (the adjoint's reverse scan) takes the cell's own Jacobian
    (h.sum()).backward()
    assert cell.calls["jacobian"] >= 1 and w.grad is not None and x.grad is not None
    if solve is newton_solve:
        assert cell.calls["value_and_jacobian"] > cell.calls["jacobian"]  # Newton's iterations, one pass each


def test_a_user_block_cell_without_closed_forms_newton_equals_sequential():
    cell = RotatingCell(torch.tensor(0.7, dtype=torch.float64))
    x, h0 = problem((5, 2), seed=2)
    h, info = newton_solve(cell, x, h0, structure=("block", 2))
    ref, _ = sequential_solve(cell, x, h0, structure=("block", 2))
    assert info.converged
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)


def test_a_plain_function_is_a_cell():
    x, h0 = problem((4,), seed=3)

    def cell(h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * h_prev + x)

    check_cell(cell)
    h, info = newton_solve(cell, x, h0)
    torch.testing.assert_close(h, sequential_solve(cell, x, h0)[0], rtol=1e-12, atol=1e-12)


class JacobianOnly:
    """Has the optional member but not the required one."""

    def jacobian(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(h_prev)


class BrokenJacobian:
    jacobian = 3.0  # not a method

    def __call__(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h_prev + x)


@pytest.mark.parametrize("solve", [newton_solve, sequential_solve], ids=["newton", "sequential"])
def test_a_cell_without_call_is_refused_naming_it(solve):
    x, h0 = problem((4,), seed=4, T=5)
    with pytest.raises(TypeError, match=r"'JacobianOnly' has no __call__.*cell\(h_prev, x\) -> h"):
        solve(JacobianOnly(), x, h0)


def test_an_optional_member_that_is_not_a_method_is_refused_naming_it():
    x, h0 = problem((4,), seed=5, T=5)
    with pytest.raises(TypeError, match=r"'BrokenJacobian': its jacobian is a float, not a method jacobian"):
        newton_solve(BrokenJacobian(), x, h0)


def test_an_optional_member_set_to_none_counts_as_absent():
    cell = BrokenJacobian()
    cell.jacobian = None  # what the solvers must read as "no closed form"
    check_cell(cell)
    x, h0 = problem((4,), seed=6, T=20)
    _, J = Structure.parse("diag").value_and_jacobian(cell, h0.unsqueeze(1).repeat(1, 20, 1), x)
    assert J.shape == x.shape  # by autodiff
