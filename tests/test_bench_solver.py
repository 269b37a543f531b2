"""`unroll bench solver` runs end to end and its numerics columns are sound (no timing is asserted:
speed figures live in the benchmark's output, not in tests)."""

import json

import pytest
import torch

from unroll.launch.cli import main


def test_bench_solver_quick_grid(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "solver", "--grid", "quick", "--repeat", "1", "--no-compiled"]  # compiling: the test below
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seq ms" in printed and "auto vs the fastest path" in printed and "machine: load average" in printed
    assert "min/median over 1 rounds" in printed and "ratios of the medians" in printed
    rows = json.loads(out.read_text())
    assert {(r["cell"], r["pass_"]) for r in rows} == {(c, p) for c in ("gru", "lstm") for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["max_err"] < 1e-5 and 1 <= r["iterations"] <= 4, r
        assert 0 < r["sequential_min_ms"] <= r["sequential_ms"] and 0 < r["newton_min_ms"] <= r["newton_ms"], r
        # the Triton scans and the fused kernel run wherever the bench's default device is CUDA, and only there
        assert (r["triton_ms"] is None) == (r["fused_ms"] is None) == (not torch.cuda.is_available()), r
        assert r["fused_max_err"] is None or r["fused_max_err"] < 1e-5, r
        assert r["compiled_ms"] is None, r  # --no-compiled


def test_bench_solver_times_the_loop_on_a_prefix_of_long_sequences(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "solver", "--grid", "quick", "--cells", "gru", "--repeat", "1", "--sequential-steps", "512"]
    argv.append("--no-compiled")
    assert main([*argv, "--json", str(out)]) == 0
    assert "* the loop timed on its first 512 steps, scaled by T/512" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    # the quick grid: T = 2048 (the loop runs 512 steps of it) and T = 256 (all of it)
    assert {(r["length"], r["sequential_steps"]) for r in rows} == {(2048, 512), (256, 256)}
    assert all(r["max_err"] < 1e-5 and r["sequential_ms"] > 0 for r in rows), rows


def test_the_triton_and_fused_paths_where_triton_runs(tmp_path):
    # what the bench adds on CUDA (the Triton scan, the fused kernel), here through Triton's interpreter at a tiny
    # size: both timed, the fused solution checked against the loop, the table printing their columns
    from unroll.kernels.triton_scan import scan_triton
    from unroll.launch.bench.solver import bench_case, format_table

    for cell in ("gru", "lstm"):
        rows = bench_case(cell, 1, 70, 4, torch.float32, torch.device("cpu"), scan_triton, rounds=1)
        for r in rows:
            assert r.triton_ms > 0 and r.fused_ms > 0 and 0 < r.fused_min_ms <= r.fused_ms
            assert r.fused_max_err < 1e-5
        assert "fused ms" in format_table(rows) and format_table(rows).count("n/a") == 2  # all but compiled


def test_bench_solver_shapes_instead_of_the_grid(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "solver", "--cells", "gru", "--repeat", "1", "--no-compiled", "--shape", "2,33,5"]
    assert main([*argv, "--shape", "1,40,3", "--json", str(out)]) == 0
    assert {(r["batch"], r["length"], r["width"]) for r in json.loads(out.read_text())} == {(2, 33, 5), (1, 40, 3)}
    with pytest.raises(SystemExit):
        main(["bench", "solver", "--shape", "1,40"])
    assert "expected B,T,D" in capsys.readouterr().err


def test_the_compiled_newton_column():
    # newton_kernel=compiled (kernels/newton.py's compiled_pieces), which the bench times off CUDA by default
    from unroll.launch.bench.solver import bench_case, format_table

    rows = bench_case("gru", 1, 40, 4, torch.float32, torch.device("cpu"), None, rounds=1, compiled=True)
    for r in rows:
        assert 0 < r.compiled_min_ms <= r.compiled_ms and r.max_err < 1e-5, r
    table = format_table(rows)
    assert "compiled ms" in table and all(line.count("n/a") == 2 for line in table.splitlines()[2:])  # triton, fused


def test_bench_solver_stiff_rows_are_sound():
    """`bench solver --stiff`'s rows (small here): damped Newton leaves no more sequences to the fallback than plain
    Newton, both end at the same solution, and the table prints them."""
    from unroll.kernels.newton import MAX_ITERS
    from unroll.launch.bench.solver_stiff import format_stiff, stiff_row

    rows = [stiff_row("lstm", scale, 4, 256, 4, torch.float64, None) for scale in (1.0, 10.0)]
    for r in rows:
        assert r.damped_fallbacks <= r.plain_fallbacks and r.damped_iterations <= MAX_ITERS, r
        assert r.damped_solved + r.damped_fallbacks <= r.batch and r.max_err < 1e-10, r
    assert rows[0].plain_fallbacks == rows[0].damped_fallbacks == rows[0].damped_solved == 0  # as initialised
    assert "damped iters" in format_stiff(rows).splitlines()[0]
