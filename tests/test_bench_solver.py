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
