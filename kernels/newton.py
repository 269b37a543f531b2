"""Solving a nonlinear recurrence h_t = f(h_{t−1}, x_t) over a whole sequence at once.

The sequence is one nonlinear system F(H) = 0, F_t = h_t − f(h_{t−1}, x_t). Newton's method linearises
it around the current guess; the correction solves the linear recurrence
    δ_t = J_t δ_{t−1} + r_t,    J_t = ∂f/∂h_{t−1},  r_t = f(h_{t−1}, x_t) − h_t,  δ_{−1} = 0,
which `linear_scan` solves in O(T) work and O(log T)-ish depth. The first guess is f(0, x).

Convergence is decided per sequence on the relative residual max_t |r_t| / (1 + |f_t|) against a
per-dtype tolerance. With damping="trust_region" (the default), where a step blows up (past 1/eps of the
value it corrects, or an overflow) the position takes the Picard step and its sequence continues with
damped steps (kernels/newton_damping.py); sequences whose steps never blow up take plain Newton's steps,
bit for bit. A sequence that has not converged after `max_iters` iterations is solved again exactly, step
by step, and `info` says so and counts which path solved what: the result is never silently wrong. That
epilogue, `fall_back_where_unconverged`, is shared with the sequence-parallel solver (seqpar_newton.py).
The cell contract (what `cell` must provide) is kernels/cell.py.

Gradients (both solvers) come from the adjoint at the solution H*: with g = ∂L/∂H*,
    λ_t = g_t + J_{t+1}ᵀ λ_{t+1}    (one reverse linear_scan),
then one batched VJP of f(shift(H*), x) with λ gives ∂L/∂x, ∂L/∂params and ∂L/∂h0. Only the inputs and
the solution are kept for the backward; no Newton iterate is stored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from unroll.kernels.cell import Cell, check_cell
from unroll.kernels.linear_scan import ScanImpl, linear_scan, mask_resets
from unroll.kernels.newton_damping import DEFAULT_DAMPING, DampedUpdate, TrustRegion, check_damping, damped_update
from unroll.kernels.structure import Structure, StructureSpec

# Relative residual a solve must reach, by the dtype it runs in.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}
MAX_ITERS = 12


@dataclass
class SolveInfo:
    iterations: int  # Newton iterations taken (0 for the sequential solver)
    residual: float  # max relative residual of the returned solution
    converged: bool  # Newton (plain or damped steps) reached the tolerance on every sequence
    fallback: str | None = None  # what was done where it did not, e.g. "sequential for 3 of 8 sequences"
    fallback_sequences: int = 0  # sequences solved by the sequential fallback
    newton_sequences: int = 0  # sequences solved by plain Newton steps only
    damped_sequences: int = 0  # sequences solved after damped steps (kernels/newton_damping.py)

    def as_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "fallback": self.fallback,
            "fallback_sequences": self.fallback_sequences,
            "newton_sequences": self.newton_sequences,
            "damped_sequences": self.damped_sequences,
        }


def shift(h: torch.Tensor, h0: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """h_{t−1} for every t: [h0, h_0, ..., h_{T−2}], zero where a new document starts; in h's memory layout
    (a block cell's state may be stored components first, see models/paralstm.py), which torch.cat would
    not keep."""
    prev = torch.empty_like(h)
    prev[:, :1] = h0.unsqueeze(1)
    prev[:, 1:] = h[:, :-1]
    if resets is not None:
        prev = prev.masked_fill(resets.view(*resets.shape, *([1] * (prev.dim() - 2))), 0)
    return prev


def residual(f: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per sequence: max over time and state of |f − h| / (1 + |f|); inf where anything is not finite."""
    r = ((f - h).abs() / (1 + f.abs())).flatten(1).amax(dim=1)
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))


def solve_limits(dtype: torch.dtype, tol: float | None, max_iters: int | None) -> tuple[float, int]:
    """(tolerance, iteration cap) of a Newton solve: the given ones, else TOLERANCE by dtype and MAX_ITERS."""
    return (TOLERANCE.get(dtype, 2e-5) if tol is None else tol), (MAX_ITERS if max_iters is None else max_iters)


def newton_terms(
    cell: Cell, st: Structure, h: torch.Tensor, h0: torch.Tensor, x: torch.Tensor, resets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At the iterate h: the cell's value f, its Jacobian J, Newton's right-hand side f − h and each
    sequence's relative residual."""
    f, J = st.value_and_jacobian(cell, shift(h, h0, resets), x)
    return f, J, f - h, residual(f, h)


def apply_cell(cell: Cell, prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return cell(prev, x)


def first_guess(cell: Cell, h0: torch.Tensor, x: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """Newton's starting iterate: every step from a zero state, f(0, x_t) (from h0 at t = 0)."""
    zeros = torch.zeros(x.shape[0], x.shape[1], *h0.shape[1:], dtype=h0.dtype, device=h0.device)
    return cell(shift(zeros, h0, resets), x)


def adjoint_transfer(
    cell: Cell, st: Structure, prev: torch.Tensor, x: torch.Tensor, resets: torch.Tensor | None
) -> torch.Tensor:
    """J_{t+1}ᵀ for every t (0 after the last step, and where step t+1 starts a document): the reverse
    scan's coefficients of the adjoint."""
    J = mask_resets(st.jacobian(cell, prev, x), resets)
    out = torch.empty_like(J)  # J's memory layout, which the scan may take without a copy
    out[:, :-1] = st.transpose(J[:, 1:])
    out[:, -1:] = 0
    return out


@dataclass(frozen=True)
class NewtonPieces:
    """A solve's work over whole sequences besides the scans: run eagerly (EAGER, the reference), or each
    piece compiled (`compiled_pieces`)."""

    terms: Callable[
        [Cell, Structure, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ]
    update: DampedUpdate
    first_guess: Callable[[Cell, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    apply_cell: Callable[[Cell, torch.Tensor, torch.Tensor], torch.Tensor]
    adjoint_transfer: Callable[[Cell, Structure, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


EAGER = NewtonPieces(newton_terms, damped_update, first_guess, apply_cell, adjoint_transfer)


@functools.cache
def compiled_pieces() -> NewtonPieces:
    """Each piece through torch.compile (inductor), for a device without a fused kernel (a CPU): run eagerly,
    a ParaGRU iteration is ~30 separate passes over [B, T, D] (each reading and writing memory, each a new
    allocation) and those passes, not the scan, are most of a solve; compiled, each piece is one loop. A piece
    compiles once per cell type and dtype on first use (seconds); a second shape recompiles it once with
    symbolic sizes (torch.compile's default), which later lengths reuse; dynamo runs eagerly what it cannot
    trace in a cell."""
    return NewtonPieces(**{piece.name: torch.compile(getattr(EAGER, piece.name)) for piece in fields(EAGER)})


class _Adjoint(torch.autograd.Function):
    """Identity on the forward; on the backward turns ∂L/∂H* into λ = (I − J S)^−ᵀ ∂L/∂H*, so that
    autograd's own VJP of the one cell application f(shift(H*), x) yields the exact gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        prev: torch.Tensor,
        x: torch.Tensor,
        cell: Cell,
        structure: Structure,
        resets: torch.Tensor | None,
        scan_impl: ScanImpl | None,
        pieces: NewtonPieces,
    ) -> torch.Tensor:
        ctx.cell, ctx.structure, ctx.resets, ctx.scan_impl, ctx.pieces = cell, structure, resets, scan_impl, pieces
        ctx.save_for_backward(prev, x)
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None, None, None]:
        prev, x = ctx.saved_tensors
        st = ctx.structure
        with torch.no_grad():
            a, b = st.to_scan(ctx.pieces.adjoint_transfer(ctx.cell, st, prev, x, ctx.resets), g)
            lam = st.from_scan(linear_scan(a, b, reverse=True, impl=ctx.scan_impl))
        return lam, None, None, None, None, None, None, None


def _attach_gradient(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    solution: torch.Tensor,
    structure: Structure,
    resets: torch.Tensor | None,
    scan_impl: ScanImpl | None,
    pieces: NewtonPieces = EAGER,
) -> torch.Tensor:
    """The solution with the adjoint gradient attached (a no-op cost-wise when nothing needs grad)."""
    if not torch.is_grad_enabled():
        return solution
    prev = shift(solution.detach(), h0, resets)
    z = pieces.apply_cell(cell, prev, x)  # = H* up to the tolerance; its graph reaches x, the cell's parameters, h0
    if not z.requires_grad:
        return solution
    # torch leaves Function.apply unannotated
    out: torch.Tensor = _Adjoint.apply(  # type: ignore[no-untyped-call]
        z, prev.detach(), x.detach(), cell, structure, resets, scan_impl, pieces
    )
    return out


def sequential_loop(cell: Cell, x: torch.Tensor, h0: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """h [B, T, *state] by the plain loop, one cell call per step (the cell always sees a [B, 1, ...] time
    axis), h_{t−1} zeroed where resets [B, T] is True. No adjoint: callers attach the gradient or run it
    under no_grad."""
    T = x.shape[1]
    out = h0.new_empty(h0.shape[0], T, *h0.shape[1:])
    h = h0
    for t in range(T):
        if resets is not None:
            h = h.masked_fill(resets[:, t].view(-1, *([1] * (h.dim() - 1))), 0)
        h = cell(h.unsqueeze(1), x[:, t : t + 1]).squeeze(1)
        out[:, t] = h
    return out


def check_inputs(
    cell: object, structure: StructureSpec, x: torch.Tensor, h0: torch.Tensor, resets: torch.Tensor | None
) -> Structure:
    """The parsed structure, after checking that `cell` is a Cell and that x [B, T, ...], h0 [B, *state]
    and resets [B, T] fit it and each other (a TypeError or ValueError naming what does not)."""
    check_cell(cell)
    st = Structure.parse(structure)
    st.check_state(h0)
    if x.shape[0] != h0.shape[0]:
        raise ValueError(f"batch of x ({x.shape[0]}) and h0 ({h0.shape[0]}) differ")
    if resets is not None and resets.shape != x.shape[:2]:
        raise ValueError(f"resets {tuple(resets.shape)} is not [B, T] = {tuple(x.shape[:2])}")
    return st


class FallbackHandoff(Protocol):
    """How the sequences redone by `fall_back_where_unconverged` meet the rest of a split sequence. The
    single-process solver has none; newton_solve_seqpar pipelines them over its ranks."""

    def receive(self, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """`start` [B, *state] with the entering state of the sequences `rows` replaced by the final
        state of the previous slice's redo."""
        ...

    def send(self, last: torch.Tensor) -> None:
        """Hands the redone sequences' last states [len(rows), *state] to the next slice."""
        ...

    def reduce(self, res: torch.Tensor) -> torch.Tensor:
        """The per-sequence residual [B] over the whole sequence, from this slice's."""
        ...


def fall_back_where_unconverged(
    cell: Cell,
    x: torch.Tensor,
    h: torch.Tensor,
    res: torch.Tensor,
    *,
    tol: float,
    iterations: int,
    start: torch.Tensor,
    resets: torch.Tensor | None,
    handoff: FallbackHandoff | None = None,
    damped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """The end of a Newton solve: (h, start, info) once Newton has stopped after `iterations` iterations
    with the per-sequence residual `res` [B] (max over the whole sequence) for the iterate h [B, T, *state].

    Sequences with res ≤ tol are kept as they are; the others (not converged, or overflowed: res is inf)
    are solved again exactly by `sequential_loop` from `start` (the state before the first step; with a
    handoff, rows of it are replaced by what the previous slice hands on), their residual recomputed, and
    `info` says how many were redone. `damped` [B] marks the sequences that took damped steps, so that info
    counts what plain Newton, damped Newton and the fallback each solved. Call under no_grad. h comes back as
    it is when every sequence converged, else as a new tensor.
    """
    B = x.shape[0]
    bad = res > tol
    damped_solved = bad.new_zeros(()) if damped is None else (damped & ~bad).sum()
    # one host read for the outcome: how many to redo, how many damped steps solved, the worst residual
    redo, by_damped, worst = torch.stack([bad.sum(), damped_solved, res.max()]).double().tolist()
    n_damped = int(by_damped)
    if not redo:
        return h, start, SolveInfo(iterations, worst, True, None, 0, B - n_damped, n_damped)
    h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))  # rows that overflowed are redone
    rows = bad.nonzero().squeeze(1)
    if handoff is not None:
        start = handoff.receive(rows, start)
    h[rows] = sequential_loop(cell, x[rows], start[rows], resets[rows] if resets is not None else None)
    if handoff is not None:
        handoff.send(h[rows, -1].contiguous())
    res = residual(cell(shift(h, start, resets), x), h)
    if handoff is not None:
        res = handoff.reduce(res)
    n_redone = len(rows)
    fallback = f"sequential for {n_redone} of {B} sequences"
    info = SolveInfo(iterations, float(res.max()), False, fallback, n_redone, B - n_redone - n_damped, n_damped)
    return h, start, info


def sequential_solve(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    *,
    structure: StructureSpec = "diag",
    resets: torch.Tensor | None = None,
    scan_impl: ScanImpl | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """The linear-time sequential solve: a loop without autograd, then the same adjoint gradient as
    Newton's (so the backward is one reverse scan, not a graph of T steps)."""
    st = check_inputs(cell, structure, x, h0, resets)
    with torch.no_grad():
        h = sequential_loop(cell, x, h0, resets)
    return _attach_gradient(cell, x, h0, h, st, resets, scan_impl), SolveInfo(0, 0.0, True)


def newton_solve(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    *,
    structure: StructureSpec = "diag",
    resets: torch.Tensor | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    scan_impl: ScanImpl | None = None,
    damping: str = DEFAULT_DAMPING,
    compiled: bool = False,
) -> tuple[torch.Tensor, SolveInfo]:
    """h: [B, T, *state] solving h_t = cell(h_{t−1}, x_t) for all t, and how it was solved.

    cell(h_prev, x) -> h is applied to all timesteps at once (h_prev, h: [B, T, *state], x: [B, T, ...]);
    it may carry a closed-form `jacobian(h_prev, x)` (the contract: kernels/cell.py). h0 [B, *state] is the
    state before the first step. tol: relative residual (default by dtype, TOLERANCE); max_iters: Newton
    iterations before the sequential fallback (default MAX_ITERS); damping: "trust_region" (damped steps for
    the sequences whose plain step blows up, kernels/newton_damping.py) or "none"; compiled: the work
    besides the scans through torch.compile (`compiled_pieces`), the same solve to float rounding.
    Differentiable in x, h0 and the cell's parameters.
    """
    st = check_inputs(cell, structure, x, h0, resets)
    tol, max_iters = solve_limits(h0.dtype, tol, max_iters)
    B, T = x.shape[:2]
    if T == 0:
        return h0.new_zeros(B, 0, *h0.shape[1:]), SolveInfo(0, 0.0, True)
    region = TrustRegion(B, h0.dtype, h0.device, st) if check_damping(damping) == "trust_region" else None
    pieces = compiled_pieces() if compiled else EAGER

    with torch.no_grad():
        h = pieces.first_guess(cell, h0, x, resets)
        iterations = 0
        while True:
            # The value comes with the Jacobian (one pass); the last Jacobian is wasted, which is cheaper
            # than evaluating the cell a second time in every iteration.
            f, J, r, res = pieces.terms(cell, st, h, h0, x, resets)
            damped = region.damped.any() if region is not None else torch.zeros((), dtype=torch.bool, device=res.device)
            outcome = torch.stack([(res <= tol).all(), torch.isfinite(res).any(), damped])
            all_converged, any_finite, any_damped = outcome.tolist()  # one host sync per iteration
            if all_converged or not any_finite or iterations >= max_iters:
                break
            if region is None:
                a, b = st.to_scan(J, r)
                h = h + st.from_scan(linear_scan(a, b, resets=resets, impl=scan_impl))
            else:
                region.engaged = bool(any_damped)
                a, b = st.to_scan(region.transfer(J), r)
                delta = st.from_scan(linear_scan(a, b, resets=resets, impl=scan_impl))
                h, outside = region.step(h, delta, f, pieces.update)
                region.widen()
                region.cut(outside)
            iterations += 1
        h, _, info = fall_back_where_unconverged(
            cell,
            x,
            h,
            res,
            tol=tol,
            iterations=iterations,
            start=h0,
            resets=resets,
            damped=region.damped if region is not None else None,
        )
    return _attach_gradient(cell, x, h0, h, st, resets, scan_impl, pieces), info
