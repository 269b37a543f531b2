"""Sequence-parallel Newton: `newton_solve` on a sequence whose time axis is split over a process group.

Rank r of the group (R ranks) holds the contiguous slice x[:, r·T/R : (r+1)·T/R] (equal slices) and gets
back its slice of the solution of the whole sequence, with exactly newton_solve's semantics (first guess,
per-sequence tolerance, iteration rule, sequential fallback, adjoint gradient). Per Newton iteration:

1. Boundary. Rank r's first step needs h_{t−1} = rank r−1's last state (rank 0: h0). It is exchanged
   once, by an all_gather of last states before the first iteration; afterwards every rank *predicts*
   its neighbour's new last state from the gathered summaries of step 3 (h_last + δ_exit, computed by
   the same ops on every rank, and the owner overwrites its own δ at the last step with that value), so
   the boundary is bitwise the neighbour's state and costs no message of its own.
2. Value and Jacobian on the local slice at shift(h, boundary), residual r_t = f_t − h_t.
3. δ_t = J_t δ_{t−1} + r_t across ranks. Each rank reduces its slice to the affine summary
   δ_exit = A_r δ_entry + d_r (A_r = J_last···J_first with the steps at resets zeroed, as mask_resets
   does; d_r the exit value from a zero entry), pairwise in log T_local steps. ONE all_gather per
   iteration carries (per-sequence residual, A_r, d_r) from every rank; each rank composes the
   summaries of the ranks before it into its entry δ_in (an exclusive scan over R summaries, done
   redundantly everywhere, O(R) small ops) and runs one local linear_scan from h0 = δ_in.
4. Convergence: the gathered residuals give the global per-sequence residual (max over ranks), so all
   ranks take the same decision at the same iteration. The summary of the final (converged) iteration is
   computed and sent speculatively — one wasted reduction buys one collective per iteration instead of
   two. With damping="trust_region" (newton_damping.py) a position may take its Picard value instead of
   h + δ: the all_gather also carries, per rank, whether its part of the last step left the trust region
   (so every rank cuts the same sequences' radii) and the cell value at its last state (so the next rank
   applies the same trust test to its boundary, on the same numbers, and takes that value where it fails).
   A cut radius changes the summary already sent: only then, after a step that left the trust region, a
   second all_gather sends the summaries again. Sequences that did not converge in max_iters (or
   overflowed) are solved by the sequential loop, pipelined: rank r receives rank r−1's final state of
   those sequences, runs its slice, sends its last state on (send/recv). One all_reduce(MAX) of the new
   residuals makes SolveInfo identical everywhere.

Bytes per iteration (`bytes_per_iteration`): each rank contributes B·(1 + D·k² + D·k) numbers to the
all_gather (diag: k = 1, i.e. B·(1 + 2D); "dense": D·k² → D², D·k → D), and receives R−1 times that;
damping adds B·(1 + D·k). A solve of n iterations runs n + 2 all_gathers: the first boundary exchange
(B·D·k numbers per rank) and one per residual check (n + 1), plus, damped, one of B·(D·k² + D·k) after
each step that left its trust region. The fallback adds a send/recv of B_bad·D·k per rank boundary and one
all_reduce of B; the backward one all_gather of B·(D·k² + D·k) per rank.

Gradient: λ_t = g_t + J_{t+1}ᵀ λ_{t+1} in reverse. With ν_t = J_tᵀ λ_t (what step t passes to t−1),
ν_t = J_tᵀ ν_{t+1} + J_tᵀ g_t is a reverse linear scan, and rank r's ν at its first step is what rank
r−1 needs after its last step. Each rank summarises its slice (reverse order) as ν_first = M_r ν_in + m_r,
one all_gather, a reverse exclusive scan over the ranks after it, one local reverse scan, then
λ_t = g_t + ν_{t+1} and newton.py's single VJP of f(shift(H*), x). Rank r > 0 applies the cell to the
received (detached) boundary state, so its contribution is carried only by the cross-rank λ recursion
(never counted twice); only rank 0's h0 gets a real gradient, and h0's gradient is exactly zero on the
other ranks. Gradients of x are the local slice's; gradients of the cell's PARAMETERS (and of h0, zero
off rank 0) are per-rank partial sums: the caller all-reduces (sums) them over the group.
Every rank must run the backward through its output once (it holds one collective), so requires_grad
must agree across the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from unroll.kernels.cell import Cell
from unroll.kernels.linear_scan import ScanImpl, apply_step, compose_steps, linear_scan, mask_resets
from unroll.kernels.newton import (
    EAGER,
    NewtonPieces,
    SolveInfo,
    check_inputs,
    compiled_pieces,
    fall_back_where_unconverged,
    shift,
    solve_limits,
)
from unroll.kernels.newton_damping import DEFAULT_DAMPING, TrustRegion, check_damping
from unroll.kernels.structure import Structure, StructureSpec

Group = dist.ProcessGroup | None  # None: the default group


@dataclass(frozen=True)
class SeqparComm:
    """Communication of one Newton iteration of newton_solve_seqpar (one all_gather)."""

    sent_per_rank: int  # bytes each rank contributes
    received_per_rank: int  # bytes each rank receives: (R − 1)·sent
    collectives: int = 1
    setup_per_rank: int = 0  # bytes each rank contributes once per solve (the first boundary exchange)

    def as_dict(self) -> dict[str, int]:
        return {
            "sent_per_rank": self.sent_per_rank,
            "received_per_rank": self.received_per_rank,
            "collectives": self.collectives,
            "setup_per_rank": self.setup_per_rank,
        }


def bytes_per_iteration(
    batch: int,
    width: int,
    world_size: int,
    *,
    structure: StructureSpec = "diag",
    dtype: torch.dtype = torch.float32,
    damping: str = DEFAULT_DAMPING,
) -> SeqparComm:
    """Bytes of one iteration for B = batch sequences, D = width (the number of k-vectors for blocks,
    the state size for "dense"), R = world_size ranks, with `damping` (newton_solve_seqpar's)."""
    st = Structure.parse(structure)
    k = st.k if st.kind == "block" else 1
    state, jac = (width, width * width) if st.kind == "dense" else (width * k, width * k * k)
    item = torch.empty((), dtype=dtype).element_size()
    sent = batch * (1 + jac + state + (1 + state if check_damping(damping) == "trust_region" else 0)) * item
    return SeqparComm(sent, (world_size - 1) * sent, 1, batch * state * item)


def _summary(a: torch.Tensor, b: torch.Tensor, block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, d) with h_last = A h_entry + d for h_t = a_t h_{t−1} + b_t over the slice (pairwise, log T steps)."""
    while a.shape[1] > 1:
        n = a.shape[1] // 2 * 2
        a1, a2, b1, b2 = a[:, 0:n:2], a[:, 1:n:2], b[:, 0:n:2], b[:, 1:n:2]
        a = torch.cat([compose_steps(a2, a1, block), a[:, n:]], dim=1)
        b = torch.cat([apply_step(a2, b1, block) + b2, b[:, n:]], dim=1)
    return a[:, 0], b[:, 0]


def _all_gather(tensors: list[torch.Tensor], group: Group) -> list[list[torch.Tensor]]:
    """Every rank's `tensors` (same shapes and dtype everywhere), by rank, in one all_gather."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = flat.new_empty(dist.get_world_size(group) * flat.numel())
    dist.all_gather_single(out, flat, group=group)
    sizes = [t.numel() for t in tensors]
    return [[p.view(t.shape) for p, t in zip(row.split(sizes), tensors)] for row in out.view(-1, flat.numel())]


def _peer(group: Group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _SeqparAdjoint(torch.autograd.Function):
    """newton.py's _Adjoint with λ carried across ranks (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        h0: torch.Tensor,
        prev: torch.Tensor,
        x: torch.Tensor,
        cell: Cell,
        structure: Structure,
        resets: torch.Tensor | None,
        scan_impl: ScanImpl | None,
        group: Group,
    ) -> torch.Tensor:
        ctx.cell, ctx.structure, ctx.resets, ctx.scan_impl, ctx.group = cell, structure, resets, scan_impl, group
        ctx.save_for_backward(prev, x)
        ctx.h0_meta = (h0.shape, h0.dtype, h0.device)
        return z.view_as(z)

    @staticmethod
    def backward(
        ctx: Any, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None, None, None, None, None]:
        prev, x = ctx.saved_tensors
        st, group = ctx.structure, ctx.group
        block, R, r = st.kind != "diag", dist.get_world_size(group), dist.get_rank(group)
        with torch.no_grad():
            Jt = st.transpose(mask_resets(st.jacobian(ctx.cell, prev, x), ctx.resets))
            a, b = st.to_scan(Jt, g)
            bJ = apply_step(a, b, block)  # J_tᵀ g_t
            parts = _all_gather(list(_summary(a.flip(1), bJ.flip(1), block)), group)
            nu_in = torch.zeros_like(parts[0][1])  # ν at the next rank's first step
            for j in range(R - 1, r, -1):
                nu_in = apply_step(parts[j][0], nu_in, block) + parts[j][1]
            nu = linear_scan(a, bJ, nu_in, reverse=True, impl=ctx.scan_impl)
            lam = st.from_scan(b + torch.cat([nu[:, 1:], nu_in.unsqueeze(1)], dim=1))
        shape, dtype, device = ctx.h0_meta
        grad_h0 = torch.zeros(shape, dtype=dtype, device=device) if r > 0 else None  # rank 0's flows via z
        return lam, grad_h0, None, None, None, None, None, None, None


def newton_solve_seqpar(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    *,
    group: Group = None,
    structure: StructureSpec = "diag",
    resets: torch.Tensor | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    scan_impl: ScanImpl | None = None,
    damping: str = DEFAULT_DAMPING,
    compiled: bool = False,
) -> tuple[torch.Tensor, SolveInfo]:
    """This rank's slice [B, T_local, *state] of newton_solve(cell, x_full, h0, ...) and how it was solved.

    x [B, T_local, ...] and resets [B, T_local] are this rank's contiguous time slice (rank r of `group`
    holds slice r; all slices equal). h0 [B, *state] is the state before the first step of the WHOLE
    sequence: only rank 0's is used, the others' must have the right shape (and get a zero gradient).
    Every rank must call this with the same B, T_local, state shape, dtype, tol, max_iters and damping.
    A reset at a rank's first step cuts the incoming boundary state. The SolveInfo (iterations, global
    max residual, fallback) is identical on every rank. Differentiable in x, h0 and the cell's
    parameters; parameter gradients are this rank's partial sums — all-reduce them over `group`.
    compiled: the forward's work besides the scans and collectives through torch.compile (newton.py's
    `compiled_pieces`: the first guess, f and J with the residual, the damped update, the cell application the
    gradient hangs on), as newton_solve's; the backward's one Jacobian stays eager.
    """
    st = check_inputs(cell, structure, x, h0, resets)
    tol, max_iters = solve_limits(h0.dtype, tol, max_iters)
    r = dist.get_rank(group)
    block = st.kind != "diag"
    B, T = x.shape[:2]
    if T == 0:  # equal slices: every rank returns here
        return h0.new_zeros(B, 0, *h0.shape[1:]), SolveInfo(0, 0.0, True)
    region = TrustRegion(B, h0.dtype, h0.device, st) if check_damping(damping) == "trust_region" else None
    pieces = compiled_pieces() if compiled else EAGER

    with torch.no_grad():
        h0d = h0.detach()
        start = h0d if r == 0 else torch.zeros_like(h0d)  # the first guess f(0, x) needs no boundary
        h = pieces.first_guess(cell, start, x, resets)
        lasts = _all_gather([h[:, -1]], group)
        boundary = h0d if r == 0 else lasts[r - 1][0]
        left_trust = h.new_zeros(B)  # damping: 1 where this rank's part of the last step left its trust region
        iterations = 0
        while True:
            f, J, rhs, res = pieces.terms(cell, st, h, boundary, x, resets)
            a, b = st.to_scan(mask_resets(J if region is None else region.transfer(J), resets), rhs)
            A, d = _summary(a, b, block)  # speculative on the last iteration: one collective, not two
            # damping: + where the last step left its trust region, and the Picard value of our last state
            parts = _all_gather([res, A, d] + ([] if region is None else [left_trust, f[:, -1]]), group)
            res = torch.stack([p[0] for p in parts]).amax(dim=0)
            left = torch.zeros(B, dtype=torch.bool, device=res.device)
            if region is not None:
                left = torch.stack([p[3] for p in parts]).amax(dim=0) > 0
                region.cut(left)
            outcome = torch.stack([(res <= tol).all(), torch.isfinite(res).any(), left.any()])
            all_converged, any_finite, any_left = outcome.tolist()
            if all_converged or not any_finite or iterations >= max_iters:
                break
            if region is not None and any_left:  # this step's radius was cut for some sequence: summarise again
                region.engaged = True
                a, b = st.to_scan(mask_resets(region.transfer(J), resets), rhs)
                parts = [
                    [p[0], A_j, d_j, *p[3:]]
                    for p, (A_j, d_j) in zip(parts, _all_gather(list(_summary(a, b, block)), group))
                ]
            delta_exit: list[
                torch.Tensor
            ] = []  # δ leaving ranks 0..r: the exclusive scan over the summaries, on every rank alike
            for j in range(r + 1):
                entering = delta_exit[-1] if delta_exit else torch.zeros_like(parts[j][2])
                delta_exit.append(apply_step(parts[j][1], entering, block) + parts[j][2])
            delta = linear_scan(a, b, delta_exit[r - 1] if r > 0 else None, impl=scan_impl)
            delta[:, -1] = delta_exit[r]  # bitwise what rank r+1 predicts for our last state
            if region is None:
                h = h + st.from_scan(delta)
                if r > 0:
                    boundary = boundary + delta_exit[r - 1].view_as(boundary)
            else:
                h, outside = region.step(h, st.from_scan(delta), f, pieces.update)
                region.widen()
                left_trust = outside.to(h.dtype)
                if r > 0:  # the previous rank's trust test at its last state, on the same numbers it had
                    entering = delta_exit[r - 1].view_as(boundary)
                    picard = parts[r - 1][4].view_as(boundary)
                    boundary = torch.where(region.inside(boundary, entering), boundary + entering, picard)
            iterations += 1
        h, boundary, info = fall_back_where_unconverged(
            cell,
            x,
            h,
            res,
            tol=tol,
            iterations=iterations,
            start=boundary,
            resets=resets,
            handoff=PipelinedHandoff(group),
            damped=region.damped if region is not None else None,
        )
    return _attach_gradient(cell, x, h0, boundary, h, st, resets, scan_impl, group, r, pieces), info


class PipelinedHandoff:
    """newton.FallbackHandoff over the ranks of `group`: the redone sequences run rank after rank, each
    rank starting from the previous rank's final state of them (send/recv), and one all_reduce(MAX) makes
    the residual, so the SolveInfo, identical everywhere."""

    def __init__(self, group: Group):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)

    def receive(self, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:  # the first slice starts from h0
            return start
        incoming = start.new_empty(len(rows), *start.shape[1:])
        dist.recv(incoming, src=_peer(self.group, self.rank - 1), group=self.group)
        start = start.clone()
        start[rows] = incoming
        return start

    def send(self, last: torch.Tensor) -> None:
        if self.rank < self.world - 1:
            dist.send(last, dst=_peer(self.group, self.rank + 1), group=self.group)

    def reduce(self, res: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(res, op=dist.ReduceOp.MAX, group=self.group)
        return res


def _attach_gradient(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    boundary: torch.Tensor,
    solution: torch.Tensor,
    st: Structure,
    resets: torch.Tensor | None,
    scan_impl: ScanImpl | None,
    group: Group,
    r: int,
    pieces: NewtonPieces,
) -> torch.Tensor:
    """newton.py's _attach_gradient, the first step's h_{t−1} being h0 on rank 0, else the detached boundary."""
    if not torch.is_grad_enabled():
        return solution
    prev = shift(solution.detach(), h0 if r == 0 else boundary.detach(), resets)
    z = pieces.apply_cell(cell, prev, x)
    if not (z.requires_grad or h0.requires_grad):
        return solution
    # torch leaves Function.apply unannotated
    out: torch.Tensor = _SeqparAdjoint.apply(  # type: ignore[no-untyped-call]
        z, h0, prev.detach(), x.detach(), cell, st, resets, scan_impl, group
    )
    return out
