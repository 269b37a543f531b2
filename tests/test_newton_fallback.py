"""The one convergence/fallback epilogue both Newton solvers end with (newton.fall_back_where_unconverged),
driven directly: for newton_solve (no handoff) and for newton_solve_seqpar (its PipelinedHandoff, the
collectives replaced by a recording stand-in for one middle rank), on iterates that did not converge."""

import pytest
import torch
import torch.distributed as dist

from unroll.kernels import seqpar_newton
from unroll.kernels.newton import fall_back_where_unconverged, residual, sequential_loop, shift


def cell(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.9 * h + x[..., 0, :]) * torch.sigmoid(x[..., 1, :] - 0.3 * h)


def problem(T: int, seed: int, B: int = 3, D: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 2, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    resets = torch.rand(B, T, generator=g) < 0.05
    return x, h0, resets


def residual_of(h, x, start, resets):
    return residual(cell(shift(h, start, resets), x), h)


def test_converged_iterates_are_kept_as_they_are():
    x, h0, resets = problem(50, seed=0)
    h = sequential_loop(cell, x, h0, resets)
    res = residual_of(h, x, h0, resets)
    out, start, info = fall_back_where_unconverged(cell, x, h, res, tol=1e-12, iterations=4, start=h0, resets=resets)
    assert out is h and start is h0
    assert info.converged and info.fallback is None and info.iterations == 4 and info.residual == float(res.max())


def test_unconverged_and_overflowed_sequences_are_redone_exactly_and_reported():
    x, h0, resets = problem(60, seed=1)
    exact = sequential_loop(cell, x, h0, resets)
    h = exact.clone()
    h[1, 30:] += 0.1  # not converged
    h[2, 7] = float("inf")  # overflowed
    res = residual_of(h, x, h0, resets)
    assert res[0] <= 1e-12 < res[1] and res[2] == float("inf")
    with torch.no_grad():
        out, start, info = fall_back_where_unconverged(
            cell, x, h, res, tol=1e-12, iterations=12, start=h0, resets=resets
        )
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    assert start is h0 and not info.converged and info.iterations == 12
    assert info.fallback == "sequential for 2 of 3 sequences" and info.fallback_sequences == 2
    assert info.residual <= 1e-12


class FakeCollectives:
    """torch.distributed's calls as rank `rank` of `world` sees them: recv hands over `incoming`, send and
    all_reduce are recorded, the latter maxing in another rank's residual `others`."""

    def __init__(self, rank: int, world: int, incoming: torch.Tensor, others: torch.Tensor):
        self.rank, self.world, self.incoming, self.others = rank, world, incoming, others
        self.sent, self.received_from, self.reduced = [], [], 0

    def install(self, monkeypatch):
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "recv", self.recv)
        monkeypatch.setattr(dist, "send", self.send)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def recv(self, tensor, src, group=None):
        self.received_from.append(src)
        tensor.copy_(self.incoming)

    def send(self, tensor, dst, group=None):
        self.sent.append((dst, tensor.clone()))

    def all_reduce(self, tensor, op=None, group=None):
        assert op == dist.ReduceOp.MAX
        self.reduced += 1
        torch.maximum(tensor, self.others, out=tensor)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_the_seqpar_handoff_pipelines_the_redone_sequences_through_the_ranks(monkeypatch, rank):
    """Rank `rank` of 3 holds the slice [rank·T, (rank+1)·T) of one sequence; Newton left sequences 0 and
    2 unconverged there, with a stale boundary. The epilogue takes their entering state from the previous
    rank (not rank 0), redoes them from it, hands their last state on (not the last rank), and reports
    the residual all-reduced over the ranks."""
    T, world = 40, 3
    x_full, h0, resets_full = problem(world * T, seed=2)
    exact_full = sequential_loop(cell, x_full, h0, resets_full)
    part = slice(rank * T, (rank + 1) * T)
    x, resets, exact = x_full[:, part], resets_full[:, part], exact_full[:, part]
    true_boundary = h0 if rank == 0 else exact_full[:, rank * T - 1]
    boundary = true_boundary.clone()
    h = exact.clone()
    bad = torch.tensor([0, 2])
    if rank > 0:
        boundary[bad] += 0.5  # Newton's boundary for the unconverged sequences is stale
    h[bad] += 0.25
    res = residual_of(h, x, boundary, resets)
    others = torch.tensor([0.0, 3e-13, 0.0], dtype=torch.float64)  # another rank's final residual
    fake = FakeCollectives(rank, world, incoming=true_boundary[bad], others=others)
    fake.install(monkeypatch)
    with torch.no_grad():
        out, start, info = fall_back_where_unconverged(
            cell,
            x,
            h,
            res,
            tol=1e-12,
            iterations=3,
            start=boundary,
            resets=resets,
            handoff=seqpar_newton.PipelinedHandoff(None),
        )
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-15)
    torch.testing.assert_close(start, true_boundary, rtol=0, atol=0)
    assert fake.received_from == ([] if rank == 0 else [rank - 1])
    if rank < world - 1:
        [(dst, last)] = fake.sent
        assert dst == rank + 1
        torch.testing.assert_close(last, exact[bad, -1], rtol=0, atol=1e-15)
    else:
        assert fake.sent == []
    assert fake.reduced == 1 and info.residual == pytest.approx(3e-13)
    assert not info.converged and info.fallback == "sequential for 2 of 3 sequences" and info.iterations == 3
