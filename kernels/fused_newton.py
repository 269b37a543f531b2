"""Newton's method for diagonal cells with Triton code of their own: the solve in one kernel launch, the
adjoint in another, as two torch custom ops, so that torch.compile keeps a Newton mixer's step in one graph.

kernels/newton.py runs the cell, its Jacobian, the residual and the scan as separate PyTorch operations and
syncs with the host once per iteration for the convergence test, which also breaks a compiled graph there.
`fused_newton_solve` instead launches kernels/triton_newton.py's Newton kernel (every program converging on
its own, on the device), then reads the outcome once. The kernel takes plain Newton steps only; with
damping="trust_region" (the default) the sequences it left unsolved are solved again by newton.py's damped
Newton (kernels/newton_damping.py), whose own epilogue redoes step by step what that leaves; with "none" they
go straight to that epilogue (`fall_back_where_unconverged`). Either way it is reported. Both steps live
inside the custom op `unroll::fused_newton`, which torch.compile treats as one opaque call; its
`SolveStats` are a tensor, read only when the metrics ask.

A cell is fused when it has
    fused_kernel: str       "module:name" of its FusedBlockKernel (kernels/triton_newton.py: k = 1, a diagonal
                            cell, state [D]; k > 1, state [D, k] with k×k Jacobian blocks),
                            e.g. "unroll.kernels.triton_cells:PARAGRU"
    fused_params() -> [P, D] its per-channel parameters (P ≤ the kernel's `params`)
    from_fused_params(params) a classmethod that rebuilds the cell from them
(custom ops take tensors and strings, so the op finds the cell's code and its PyTorch form, for the fallback,
by name).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from unroll.kernels import triton_newton
from unroll.kernels.newton import SolveInfo, fall_back_where_unconverged, newton_solve, solve_limits
from unroll.kernels.newton_damping import DEFAULT_DAMPING, check_damping
from unroll.kernels.triton_scan import SUPPORTED_DTYPES, interpreted


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _kernel(name: str, h0: torch.Tensor, params: torch.Tensor) -> triton_newton.FusedBlockKernel:
    """The cell's FusedBlockKernel, checked against the state and parameters it is given (inside the ops: resolving
    a name imports, which torch.compile would not trace)."""
    code = _resolve(name)
    if not isinstance(code, triton_newton.FusedBlockKernel):
        raise TypeError(f"fused_kernel {name!r} is a {type(code).__name__}, not a FusedBlockKernel")
    k = h0.shape[2] if h0.dim() == 3 else 1
    if code.k != k or h0.dim() != 2 + (k > 1):
        state = f"[B, D, {code.k}]" if code.k > 1 else "[B, D]"
        raise ValueError(f"fused_kernel {name!r} has {code.k}×{code.k} blocks: its state is {state}, "
                         f"not {list(h0.shape)}")  # fmt: skip
    if params.shape[0] > code.params:
        raise ValueError(f"fused_kernel {name!r} returns {code.params} parameter gradients; the cell has "
                         f"{params.shape[0]} parameter vectors")  # fmt: skip
    return code


@torch.library.custom_op("unroll::fused_newton", mutates_args=())
def _fused_newton(
    u: torch.Tensor,
    params: torch.Tensor,
    h0: torch.Tensor,
    starts: torch.Tensor | None,
    tol: float,
    max_iters: int,
    kernel: str,
    cell_class: str,
    damping: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [B, T, *state], stats float64 [4]: iterations, residual, sequences redone step by step, sequences
    solved by damped Newton)."""
    code = _kernel(kernel, h0, params)
    h, iters, res = triton_newton.launch_newton(code, u, params, h0, starts, tol, max_iters)
    resets = None if starts is None else starts.bool()
    cell = _resolve(cell_class).from_fused_params(params)
    res = res.amax(dim=1)
    unsolved = res > tol
    # the one host sync (where every sequence converged): the outcome
    outcome = torch.stack([iters.max().double(), res.masked_fill(unsolved, 0).max().double(), unsolved.sum().double()])
    iterations, worst_solved, n_unsolved = outcome.tolist()
    if n_unsolved and damping != "none":
        rows = unsolved.nonzero().squeeze(1)
        with torch.no_grad():
            h_rows, redo = newton_solve(
                cell,
                u[rows],
                h0[rows],
                structure=("block", code.k) if code.k > 1 else "diag",
                resets=None if resets is None else resets[rows],
                tol=tol,
                max_iters=max_iters,
                damping=damping,
            )
        h[rows] = h_rows
        counts = [iterations + redo.iterations, max(worst_solved, redo.residual), redo.fallback_sequences]
        counts.append(redo.damped_sequences)
    elif n_unsolved:
        h, _, info = fall_back_where_unconverged(
            cell, u, h, res, tol=tol, iterations=int(iterations), start=h0, resets=resets
        )
        counts = [info.iterations, info.residual, info.fallback_sequences, 0]
    else:
        counts = [iterations, worst_solved, 0, 0]
    return h.contiguous(), torch.tensor(counts, dtype=torch.float64).to(u.device)


@_fused_newton.register_fake
def _(u, params, h0, starts, tol, max_iters, kernel, cell_class, damping):  # type: ignore[no-untyped-def]
    B, T = u.shape[:2]
    return u.new_empty(B, T, *h0.shape[1:]), u.new_empty(4, dtype=torch.float64)


@torch.library.custom_op("unroll::fused_newton_adjoint", mutates_args=())
def _fused_adjoint(
    g: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    params: torch.Tensor,
    h0: torch.Tensor,
    starts: torch.Tensor | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂u, ∂L/∂params, ∂L/∂h0) from g = ∂L/∂h."""
    return triton_newton.launch_adjoint(_kernel(kernel, h0, params), g.contiguous(), h, u, params, h0, starts)


@_fused_adjoint.register_fake
def _(g, h, u, params, h0, starts, kernel):  # type: ignore[no-untyped-def]
    return torch.empty_like(u), torch.empty_like(params), torch.empty_like(h0)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    u, params, h0, starts, _, _, kernel, _, _ = inputs
    ctx.kernel = kernel
    ctx.save_for_backward(output[0], u, params, h0, starts)


def _backward(ctx: Any, g: torch.Tensor, _stats: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    h, u, params, h0, starts = ctx.saved_tensors
    du, dparams, dh0 = _fused_adjoint(g, h, u, params, h0, starts, ctx.kernel)
    return du, dparams, dh0, None, None, None, None, None, None


_fused_newton.register_autograd(_backward, setup_context=_setup)


class SolveStats:
    """A fused solve's SolveInfo, kept on the device until first read (one sync; the metrics read several
    fields): the same fields."""

    def __init__(self, stats: torch.Tensor, batch: int) -> None:
        self.stats, self.batch = stats.detach(), batch
        self._read: SolveInfo | None = None

    def info(self) -> SolveInfo:
        if self._read is None:
            self._read = self._from_device()
        return self._read

    def _from_device(self) -> SolveInfo:
        iterations, residual, redone, by_damped = self.stats.tolist()
        n, n_damped = int(redone), int(by_damped)  # the rest were solved by plain Newton steps
        if not n:
            return SolveInfo(int(iterations), residual, True, None, 0, self.batch - n_damped, n_damped)
        fallback = f"sequential for {n} of {self.batch} sequences"
        return SolveInfo(int(iterations), residual, False, fallback, n, self.batch - n - n_damped, n_damped)

    def __getattr__(self, name: str) -> Any:  # iterations, residual, converged, fallback, ... as SolveInfo's
        return getattr(self.info(), name)


def fused_newton_solve(
    cell: Any,
    u: torch.Tensor,
    h0: torch.Tensor,
    *,
    resets: torch.Tensor | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    damping: str = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, SolveStats]:
    """newton_solve of a fused cell (module docstring), u [B, T, G, D] its inputs (G gates), h0 its state [B, D]
    (diagonal) or [B, D, k] (k×k blocks): (h [B, T, *state], how it was solved), differentiable in u, h0 and the
    cell's parameters. damping: what solves the sequences the kernel leaves unsolved (the module docstring)."""
    check_damping(damping)
    params = cell.fused_params()
    if u.dtype not in SUPPORTED_DTYPES or u.dtype != h0.dtype:
        raise TypeError(f"fused_newton_solve: u {u.dtype} and h0 {h0.dtype} must be one float dtype")
    if u.device.type != "cuda" and not interpreted():
        raise RuntimeError("fused_newton_solve needs a CUDA device or TRITON_INTERPRET=1 (set before importing)")
    block = h0.shape[2:]  # () for a diagonal cell, (k,) for k×k blocks: the kernel's k is checked in the op
    if u.dim() != 4 or h0.shape[:2] != (u.shape[0], u.shape[-1]) or len(block) > 1 or params.shape[1:] != u.shape[3:]:
        raise ValueError(
            f"fused_newton_solve: u {tuple(u.shape)}, h0 {tuple(h0.shape)}, params {tuple(params.shape)} "
            "are not [B, T, G, D], [B, D] (or [B, D, k]), [P, D]"
        )
    if params.shape[0] < 1:
        raise ValueError("fused_newton_solve: the cell has no parameter vectors (fused_params is [0, D])")
    if resets is not None and resets.shape != u.shape[:2]:
        raise ValueError(f"resets {tuple(resets.shape)} is not [B, T] = {tuple(u.shape[:2])}")
    tol, max_iters = solve_limits(h0.dtype, tol, max_iters)
    B, T = u.shape[:2]
    if T == 0:
        return h0.new_zeros(B, 0, *h0.shape[1:]), SolveStats(torch.zeros(4, dtype=torch.float64), B)
    starts = None if resets is None else resets.to(torch.uint8).contiguous()
    cell_class = f"{type(cell).__module__}:{type(cell).__qualname__}"
    h, stats = _fused_newton(
        u.contiguous(), params.to(u.dtype).contiguous(), h0.contiguous(), starts, tol, max_iters,
        cell.fused_kernel, cell_class, damping,
    )  # fmt: skip
    return h, SolveStats(stats, B)
