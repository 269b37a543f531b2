"""`unroll bench seqpar` runs end to end (its own 2-rank torchrun launch included) and its numerics and
communication columns are sound (no timing is asserted: speed figures live in the benchmark's output)."""

import json
import os

import torch

from unroll.kernels.seqpar_newton import bytes_per_iteration
from unroll.launch.bench.seqpar import _structure, main


def test_bench_seqpar_quick_grid(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--grid", "quick", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2-rank ms" in printed and "effic." in printed and "machine: load average" in printed
    # the note on 2 ranks × 1 thread (the default) sharing the cores, printed iff they do
    assert ("share the cores" in printed) == (2 * 1 >= (os.cpu_count() or 1)), printed
    assert "1 torch thread(s) in each of 2 processes" in printed and "effic. of the medians" in printed
    rows = json.loads(out.read_text())
    assert {(r["cell"], r["pass_"]) for r in rows} == {(c, p) for c in ("gru", "lstm") for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert 0 < r["one_rank_min_ms"] <= r["one_rank_ms"] and 0 < r["two_rank_min_ms"] <= r["two_rank_ms"], r
        assert r["efficiency"] == r["one_rank_ms"] / r["two_rank_ms"], r
        assert r["iterations_1"] >= 1 and r["iterations_2"] >= 1 and r["fallback"] is None, r
        assert r["max_err"] < 1e-5, r  # float32, against newton_solve of the full 2·T_local sequence
        comm = bytes_per_iteration(r["batch"], r["width"], 2, structure=_structure(r["cell"]), dtype=torch.float32)
        assert r["bytes_per_iteration"] == comm.sent_per_rank, r
        # forward: the first boundary exchange, then one all_gather per residual check (iterations + 1)
        forward = comm.setup_per_rank + (r["iterations_2"] + 1) * comm.sent_per_rank
        if r["pass_"] == "fwd":
            assert r["bytes_per_solve"] == forward and r["collectives_per_solve"] == r["iterations_2"] + 2, r
        else:  # + the backward's all_gather and the all-reduce of the parameter gradients
            assert r["bytes_per_solve"] > forward and r["collectives_per_solve"] == r["iterations_2"] + 4, r


def test_two_ranks_and_one_rank_alternate_inside_the_launch():
    """_time_both on a 1-process gloo group: rank 0 runs both paths, A B A B after one warm-up of each."""
    import torch.distributed as dist

    from unroll.launch.bench.seqpar import _time_both

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        calls = []
        times = _time_both(lambda: calls.append("two"), lambda: calls.append("one"), torch.device("cpu"), 3)
    finally:
        dist.destroy_process_group()
    assert calls == ["two", "one"] * 4
    assert set(times) == {"two", "one"} and all(len(t.seconds) == 3 for t in times.values())
