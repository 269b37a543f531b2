"""`unroll bench tnt` runs end to end with tiny settings: Titans at two chunk sizes and TNT side by side,
with the sequential chunk steps each layout needs counted (no timing is asserted)."""

import json

import torch

from unroll.launch.cli import main


def test_bench_tnt_prints_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rows.json"
    before, real, set_to = torch.get_num_threads(), torch.set_num_threads, []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (set_to.append(n), real(n)))
    assert (
        main(
            [
                "bench",
                "tnt",
                "--seq-len",
                "64",
                "--batch",
                "1",
                "--d-model",
                "16",
                "--heads",
                "2",
                "--global-chunk",
                "32",
                "--local-chunk",
                "4",
                "--reset",
                "16",
                "--rounds",
                "2",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "titans C=8" in printed and "tnt C_G=32 C_L=4 S_L=16" in printed and "ratio" in printed
    assert "machine: load average" in printed and "1 torch thread(s)" in printed and "2 rounds" in printed
    assert set_to == [1, before] and torch.get_num_threads() == before  # --threads applied, then restored
    rows = json.loads(out.read_text())
    assert [r["sequential_steps"] for r in rows] == [64 // 8, 64 // 64, 64 // 32 + 16 // 4]
    assert rows[0]["vs_baseline"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["step_min_ms"] <= r["step_ms"] for r in rows)
