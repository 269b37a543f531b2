"""`unroll bench tnt` runs end to end with tiny settings: Titans at two chunk sizes and TNT side by side,
with the sequential chunk steps each layout needs counted (no timing is asserted)."""

import json

from unroll.launch.cli import main


def test_bench_tnt_prints_the_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
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
                "--repeat",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "titans C=8" in printed and "tnt C_G=32 C_L=4 S_L=16" in printed and "ratio" in printed
    rows = json.loads(out.read_text())
    assert [r["sequential_steps"] for r in rows] == [64 // 8, 64 // 64, 64 // 32 + 16 // 4]
    assert rows[0]["vs_baseline"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
