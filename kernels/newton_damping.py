"""Damped Newton: a trust region on Newton's steps and on the Jacobian of its linear recurrence, engaged per
sequence only where a plain Newton step blows up (newton_solve and newton_solve_seqpar, `damping=`).

Why plain Newton fails. Each Newton correction solves δ_t = J_t δ_{t−1} + r_t (newton.py). Where the cell
is expansive at the current iterate over a long stretch (|J| ≫ 1 where the iterate sits, even when the
solution itself is contractive), δ grows like the product of the |J|: past 1/eps of the dtype the new value
holds no digit of the old one (h_t is rounded away in h_t + δ_t), and once δ overflows (float32: a product
of 2s over 128 steps) a NaN travels the scan and plain Newton never recovers: the sequence goes to the
sequential fallback.

What is kept: the prefix property. For ANY transfer A_t in δ_t = A_t δ_{t−1} + r_t, positions already exact
stay exact (their r and δ are 0) and the first inexact one becomes exact (its δ is its r, and so is the
Picard value f(h_{t−1}) used below). So every step here, damped or not, adds at least one exact position,
and a sequence of length T is solved in at most T iterations whatever happens. (ELK's Levenberg–Marquardt
step, solved by a Kalman smoother, shrinks the whole step instead, the first wrong position included, and
gives that guarantee up; it also needs k×k Riccati scans. Changing the Jacobian, as quasi-DEER does, keeps it.)

The method, damping="trust_region":
  1. Per position, the step must stay in its trust region: where |δ_t| > (1 + |h_t|)/eps (or is not
     finite) the position takes the Picard step h_t ← f(h_{t−1}) (the cell value at the current iterate,
     already computed for the residual) instead of h_t + δ_t. Positions before the blow-up keep Newton's
     step: that is where its progress is (the garbage is downstream of the converged prefix, which often
     grows far in the very step whose tail overflows).
  2. Per sequence b, a trust radius ρ_b on the transfer of the next steps:
         A_t = J_t · min(1, ρ_b / ‖J_t‖)    (‖·‖: |·| for "diag", else Frobenius, ≥ the spectral norm)
     ρ_b = ∞ is plain Newton. A sequence with a position outside its trust region gets ρ_b = FIRST_RADIUS
     (1: the recurrence becomes non-expansive, |δ_t| ≤ Σ_s |r_s|), or half its radius if it was damped
     already; every step without one doubles ρ_b, back to plain Newton past MAX_RADIUS (Levenberg–Marquardt's
     λ after success): a rescued sequence finishes with Newton's quadratic steps. Steps with ‖J_t‖ ≤ ρ_b are
     Newton's anyway, so near a contractive solution damping changes little.
The test is deliberately not "the residual increased" (classic LM): Newton on stiff ParaRNN cells often
raises its residual 10–10⁴× on its way to converging, and damping at the first increase made such sequences
slower. Neither is a step that blows up rejected as a whole (LM's reject): that throws away the converged
region the step grew, and in trials it left sequences unsolved that plain Newton solves with more iterations.

Costs and guarantees: (a) at least one more exact position per iteration per sequence; (b) one scan per
iteration as before, no extra cell evaluation, a few elementwise passes for the trust test; the clip runs
only once some sequence of the batch is damped (known from the solver's existing per-iteration host sync);
the sequence-parallel solver sends B·(1 + D·k) more numbers in its per-iteration all_gather and needs a
second all_gather only after a step that left its trust region (seqpar_newton.py). Where every sequence
overflows, plain Newton stops at once and falls back; damped Newton keeps them alive and may iterate up to
the cap first. (c) A sequence whose steps never leave the trust region takes plain Newton's steps bit for
bit (A = J and h + δ selected exactly), so results on well-behaved sequences do not change. (d) Every
decision is per sequence (per position for the Picard step), on the device.

Measured (`unroll bench solver --stiff`: 16 sequences of 2048 steps, 8 channels, ParaGRU and ParaLSTM with
their initial recurrent weights ×1, ×8, ×10, ×12, float32 and float64, the default 12 iterations): damped
Newton never leaves more sequences to the fallback than plain Newton; as initialised both converge in 2–3
iterations, identically; ParaLSTM ×8 leaves 9 of 16 instead of 16 (float32) and 8 instead of 15 (float64),
×10 float64 6 instead of 14; ParaGRU ×8–12 and ParaLSTM ×12 stay beyond both (memory longer than 12
iterations can bridge). tests/test_newton_damping.py's stiff cells: plain Newton leaves every sequence to the
fallback, damped Newton solves them in 3–4 iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unroll.kernels.structure import Structure

DAMPINGS = ("none", "trust_region")
DEFAULT_DAMPING = "trust_region"
FIRST_RADIUS = 1.0  # after a blown-up plain step: the linear recurrence becomes non-expansive
GROWTH = 2.0  # the radius after each step that stayed in its trust region, times this
MAX_RADIUS = 16.0  # a radius grown past this is plain Newton again


def check_damping(damping: str) -> str:
    if damping not in DAMPINGS:
        raise ValueError(f"damping {damping!r}: expected one of {', '.join(DAMPINGS)}")
    return damping


def step_limit(dtype: torch.dtype) -> float:
    """How many times (1 + |h_t|) a step δ_t may be before h_t + δ_t holds no digit of h_t: 1/eps."""
    return 1.0 / torch.finfo(dtype).eps


def clip_transfer(J: torch.Tensor, radius: torch.Tensor, structure: Structure) -> torch.Tensor:
    """J with each step's Jacobian scaled to norm ≤ radius[b] of its sequence (J unchanged, exactly, where
    the radius is inf)."""
    norm = J.abs() if structure.kind == "diag" else torch.linalg.matrix_norm(J).unsqueeze(-1).unsqueeze(-1)
    r = radius.view(-1, *([1] * (J.dim() - 1)))
    return torch.where(torch.isinf(r), J, J * (r / norm).clamp(max=1))  # norm 0: r/0 = inf, scale 1


def inside_region(h: torch.Tensor, delta: torch.Tensor, limit: float, diag: bool) -> torch.Tensor:
    """Where the step δ stays in h's trust region, |δ| ≤ (1 + |h|)·limit (False where δ is not finite), for
    every component of a k-vector (or of the whole state, "dense"): they are coupled, one position. The
    result broadcasts against h."""
    ok = delta.abs() <= h.abs() * limit + limit  # NaN compares False
    return ok if diag else ok.all(dim=-1, keepdim=True)


def damped_update(
    h: torch.Tensor, delta: torch.Tensor, f: torch.Tensor, limit: float, diag: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """TrustRegion.step as a pure function (so that it can be compiled): h + δ, or f where δ leaves the
    trust region, and [B] whether each sequence had such a position."""
    ok = inside_region(h, delta, limit, diag)
    return torch.where(ok, h + delta, f), ~ok.flatten(1).all(dim=1)


DampedUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor]]


class TrustRegion:
    """The per-sequence state of a damped solve, on the device: each sequence's radius for its next step
    (inf: plain Newton), the radius before the last widening, and whether it ever took a damped step."""

    def __init__(self, batch: int, dtype: torch.dtype, device: torch.device, structure: Structure):
        self.structure = structure
        self.radius = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.previous_radius = self.radius
        self.damped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.limit = step_limit(dtype)
        self.engaged = False  # set by the solver from its host sync: some sequence is damped, clip from now on

    def transfer(self, J: torch.Tensor) -> torch.Tensor:
        """The Jacobians the next step's scan uses: J itself until some sequence is damped."""
        return clip_transfer(J, self.radius, self.structure) if self.engaged else J

    def inside(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Where the step δ stays in h's trust region (`inside_region`)."""
        return inside_region(h, delta, self.limit, self.structure.kind == "diag")

    def step(
        self, h: torch.Tensor, delta: torch.Tensor, f: torch.Tensor, update: DampedUpdate | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the new iterate: h + δ, with the Picard value f where the step leaves the trust region; [B]
        whether each sequence had such a position). `update`: `damped_update` or a compiled copy of it."""
        return (update or damped_update)(h, delta, f, self.limit, self.structure.kind == "diag")

    def widen(self) -> None:
        """After a step: every radius grows (past MAX_RADIUS: plain Newton), as if no step had left its
        trust region; `cut` then corrects the sequences where one did."""
        self.previous_radius = self.radius
        grown = self.radius * GROWTH
        self.radius = torch.where(grown > MAX_RADIUS, math.inf, grown)

    def cut(self, rows: torch.Tensor) -> None:
        """The last step of the sequences `rows` [B] (over the whole sequence) left its trust region: they are
        damped, their radius FIRST_RADIUS after a plain step, else half the radius of that step."""
        self.damped = self.damped | rows
        failed = self.previous_radius
        self.radius = torch.where(rows, torch.where(torch.isinf(failed), FIRST_RADIUS, failed / GROWTH), self.radius)
