"""newton_solve_seqpar on 2 and 4 gloo ranks against the single-process newton_solve, float64.

One torchrun launch per world size runs every check (tests/seqpar_worker.py) and writes one JSON per
rank; the tests below read them. Checks: ParaGRU (diag), ParaLSTM (2×2 blocks), the M²RNN row cell
(3×3 blocks), a dense autodiff cell; resets at random places and exactly at every rank boundary;
forced sequential fallback for all sequences (max_iters=0) and for one of two (a hard cell); damped
steps on stiff cells (tests/stiff_cells.py), diagonal and 2×2; on 2 ranks, ParaGRU and the stiff 2×2 cell with
the compiled pieces (compiled=True);
a one-rank group, and on 4 ranks two independent 2-rank groups (send/recv by global rank)."""

from pathlib import Path

import pytest
import torch
from conftest import run_workers

from unroll.kernels.seqpar_newton import bytes_per_iteration

WORKER = Path(__file__).with_name("seqpar_worker.py")
SOLVES = [
    "diag",
    "diag_no_resets",
    "block2",
    "m2rnn",
    "dense",
    "fallback_all",
    "fallback_partial",
    "converges_hard",
    "stiff_diag",
    "stiff_block",
    "clipped",
    "one_rank_group",
    "subgroup_pairs",
    "diag_compiled",
    "stiff_block_compiled",
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    """Per-rank results of one torchrun launch with `param` processes."""
    world = request.param
    return run_workers(WORKER, world, tmp_path_factory.mktemp(f"seqpar{world}"), timeout=240)


def solves(ranks: list[dict], name: str) -> list[dict]:
    if name not in ranks[0]:
        pytest.skip(f"{name} does not run on {len(ranks)} ranks")
    return [res[name] for res in ranks]


@pytest.mark.parametrize("name", SOLVES)
def test_forward_and_gradients_equal_the_single_process_solve(ranks, name):
    for r, res in enumerate(solves(ranks, name)):
        assert res["fwd"] <= 1e-10, (r, res)  # this rank's slice of the solution
        assert res["grad_x"] <= 1e-9, (r, res)  # ∂L/∂(local x)
        assert res["grad_h0"] <= 1e-9, (r, res)  # all-reduced: rank 0's real gradient, zero elsewhere
        assert res["grad_params"] <= 1e-9, (r, res)  # all-reduced partial sums


@pytest.mark.parametrize("name", SOLVES)
def test_solve_info_is_identical_on_every_rank_and_equals_the_single_process_one(ranks, name):
    results = solves(ranks, name)
    groups = (
        [results[:2], results[2:]]
        if name == "subgroup_pairs"
        else [[res] for res in results]
        if name == "one_rank_group"
        else [results]
    )  # each group solves its own problem
    for group in groups:
        infos = [res["info"] for res in group]
        assert all(info == infos[0] for info in infos), infos
    for res in results:
        info, ref = res["info"], res["ref_info"]
        assert info["iterations"] == ref["iterations"], (info, ref)
        assert info["converged"] == ref["converged"] and info["fallback"] == ref["fallback"], (info, ref)
        assert info["residual"] <= 1e-12


@pytest.mark.parametrize("name", ["stiff_diag", "stiff_block", "clipped", "stiff_block_compiled"])
def test_damped_steps_are_taken_on_the_same_sequences_as_in_one_process(ranks, name):
    """Stiff cells (tests/stiff_cells.py): plain Newton's first steps blow up; every rank takes the damped
    steps of the single-process solve (its Picard values at rank boundaries included) and solves them all.
    "clipped" (a stiff ParaGRU) runs 35 iterations with the trust radius clipping its Jacobians, 31 without:
    the radii cut after a step must reach every rank's summary of the next one."""
    for res in solves(ranks, name):
        info, ref = res["info"], res["ref_info"]
        assert info == ref | {"residual": info["residual"]}, (info, ref)
        assert info["damped_sequences"] >= 1 and info["fallback"] is None, info


def test_forced_fallback_is_exact_and_reported(ranks):
    everything, partial = solves(ranks, "fallback_all")[0]["info"], solves(ranks, "fallback_partial")[0]["info"]
    assert everything == {
        "iterations": 0,
        "residual": everything["residual"],
        "converged": False,
        "fallback": "sequential for 2 of 2 sequences",
        "fallback_sequences": 2,
        "newton_sequences": 0,
        "damped_sequences": 0,
    }
    assert partial["iterations"] == 3 and not partial["converged"]
    assert partial["fallback"] == "sequential for 1 of 2 sequences" and partial["fallback_sequences"] == 1


@pytest.mark.parametrize("name", ["comm_diag", "comm_m2rnn"])
def test_one_all_gather_per_iteration_of_the_announced_size(ranks, name):
    for res in solves(ranks, name):
        expected, sent = res["expected"], res["sent"]
        assert len(sent) == res["iterations"] + 2  # the first boundary exchange, then one per residual check
        assert sent[0] == expected["setup_per_rank"]
        assert set(sent[1:]) == {expected["sent_per_rank"]}
        assert expected["received_per_rank"] == (len(ranks) - 1) * expected["sent_per_rank"]


def test_bytes_per_iteration_formula():
    diag = bytes_per_iteration(8, 1024, 4, dtype=torch.float32, damping="none")
    assert diag.sent_per_rank == 8 * (1 + 2 * 1024) * 4 and diag.received_per_rank == 3 * diag.sent_per_rank
    assert diag.collectives == 1 and diag.setup_per_rank == 8 * 1024 * 4
    block = bytes_per_iteration(2, 64, 8, structure=("block", 16), dtype=torch.bfloat16, damping="none")
    assert block.sent_per_rank == 2 * (1 + 64 * 16 * 16 + 64 * 16) * 2
    dense = bytes_per_iteration(2, 5, 2, structure="dense", dtype=torch.float64, damping="none")
    assert dense.sent_per_rank == 2 * (1 + 25 + 5) * 8
    # damping (the default) adds, per sequence, the trust flag and the cell value at the last state
    assert bytes_per_iteration(8, 1024, 4).sent_per_rank == 8 * (1 + 2 * 1024 + 1 + 1024) * 4
    damped_block = bytes_per_iteration(2, 64, 8, structure=("block", 16), dtype=torch.bfloat16)
    assert damped_block.sent_per_rank == 2 * (1 + 64 * 16 * 16 + 64 * 16 + 1 + 64 * 16) * 2


@pytest.mark.parametrize("name", ["diag_compiled", "stiff_block_compiled"])
def test_compiled_pieces_are_compiled_on_every_rank(ranks, name):
    # compiled=True really went through torch.compile (equal results alone would not show it): the pieces'
    # graphs are compiled on each rank during its first compiled solve; the eager solves compile none
    for res in solves(ranks, name):
        assert res["graphs_compiled"] >= 3, res  # first guess, terms, the cell application; damped: the update too
    assert all(res["diag"]["graphs_compiled"] == 0 for res in ranks)
