"""`unroll bench m2rnn` runs end to end (no timing is asserted). Without CUDA only the PyTorch loop is timed;
on a GPU the Triton kernels run beside it and must agree with it."""

import json

import torch

from unroll.launch.cli import main


def test_bench_m2rnn_quick_grid(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "m2rnn", "--grid", "quick", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loop ms" in printed and "min/median over 1 rounds" in printed and "machine: load average" in printed
    rows = json.loads(out.read_text())
    assert [r["pass_"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert 0 < r["torch_min_ms"] <= r["torch_ms"], r
        if torch.cuda.is_available():  # the bench's default device
            assert r["max_err"] < 1e-3 and 0 < r["triton_min_ms"] <= r["triton_ms"], r
        else:
            assert r["triton_ms"] is None and r["max_err"] is None, r
