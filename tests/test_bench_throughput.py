"""`unroll bench throughput` runs end to end on the tiny presets (figures live in its output, no timing
is asserted)."""

import json

import pytest

from unroll.launch.cli import main


def test_bench_throughput_runs_every_tiny_family(tmp_path, capsys):
    out = tmp_path / "rows.json"
    presets = "tiny-transformer,tiny-gru,tiny-lstm,tiny-m2rnn,tiny-moe"
    assert (
        main(
            [
                "bench",
                "throughput",
                "--presets",
                presets,
                "--batch",
                "2",
                "--seq-len",
                "16",
                "--repeat",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "tiny-moe" in printed and "machine: load average" in printed
    assert "1 rounds, the presets alternating" in printed and "(of the medians)" in printed
    rows = json.loads(out.read_text())
    assert [r["preset"] for r in rows] == presets.split(",")
    assert rows[0]["vs_baseline"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["step_min_ms"] <= r["step_ms"] for r in rows)
    assert "TFLOP/s" in printed  # model FLOPs per token (models/flops.py) × tokens/s
    assert all(r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12) for r in rows)
    moe = rows[-1]
    assert moe["params_active"] < moe["params"]


def test_bench_throughput_compares_isolated_documents_with_packed_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "throughput", "--presets", "tiny-gru,tiny-tnt", "--batch", "2", "--seq-len", "16"]
    assert main([*argv, "--repeat", "1", "--documents", "4", "--json", str(out)]) == 0
    assert "isolated/packed" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["preset"], r["documents"]) for r in rows] == [
        ("tiny-gru", "packed"),
        ("tiny-gru", "isolated"),
        ("tiny-tnt", "packed"),
        ("tiny-tnt", "isolated"),
    ]
    assert all(r["isolated_vs_packed"] > 0 for r in rows if r["documents"] == "isolated")


def test_bench_throughput_trains_under_bf16_autocast(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "throughput", "--presets", "tiny-gru", "--batch", "2", "--seq-len", "16", "--repeat", "1"]
    assert main([*argv, "--dtype", "bfloat16", "--json", str(out)]) == 0
    assert "bfloat16 autocast" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["dtype"] == "bfloat16" and row["tokens_per_s"] > 0
