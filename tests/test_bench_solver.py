"""`unroll bench solver` runs end to end and its numerics columns are sound (no timing is asserted:
speed figures live in the benchmark's output, not in tests)."""

import json

import torch

from unroll.launch.cli import main


def test_bench_solver_quick_grid(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "solver", "--grid", "quick", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seq ms" in printed and "auto vs the fastest path" in printed and "machine: load average" in printed
    assert "min/median over 1 rounds" in printed and "ratios of the medians" in printed
    rows = json.loads(out.read_text())
    assert {(r["cell"], r["pass_"]) for r in rows} == {(c, p) for c in ("gru", "lstm") for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["max_err"] < 1e-5 and 1 <= r["iterations"] <= 4, r
        assert 0 < r["sequential_min_ms"] <= r["sequential_ms"] and 0 < r["newton_min_ms"] <= r["newton_ms"], r
        # the Triton scans run wherever the bench's default device is CUDA, and only there
        assert (r["triton_ms"] is None) == (not torch.cuda.is_available()), r


def test_bench_solver_times_the_loop_on_a_prefix_of_long_sequences(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "solver", "--grid", "quick", "--cells", "gru", "--repeat", "1", "--sequential-steps", "512"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "* the loop timed on its first 512 steps, scaled by T/512" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    # the quick grid: T = 2048 (the loop runs 512 steps of it) and T = 256 (all of it)
    assert {(r["length"], r["sequential_steps"]) for r in rows} == {(2048, 512), (256, 256)}
    assert all(r["max_err"] < 1e-5 and r["sequential_ms"] > 0 for r in rows), rows
