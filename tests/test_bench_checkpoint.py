"""`unroll bench checkpoint` runs end to end on a small model: save, dd, load and read timed side by side,
the async save's figures beside them (figures live in its output; no speed is asserted)."""

import json

from unroll.launch.cli import main


def test_bench_checkpoint_prints_bandwidths_and_ratios(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert (
        main(
            [
                "bench",
                "checkpoint",
                "tiny-gru",
                "model.d_model=64",
                "--dir",
                str(tmp_path),
                "--repeat",
                "2",
                "--steps",
                "1",
                "--seq-len",
                "8",
                "--io-threads",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    labels = ("machine: load average", "save ", "dd ", "load ", "read ", "save/dd ", "load/read ", "(of the medians;")
    for label in (*labels, "async save: blocks the loop"):
        assert label in printed, printed
    result = json.loads(out.read_text())
    assert result["io_threads"] == 2 and result["overrides"] == ["model.d_model=64"]
    assert result["files"] == 2 + 5  # 2 shard files (one per io thread), .metadata, checksums, rng, state, manifest
    for row in result["rows"].values():
        assert len(row["seconds"]) == 2 and 0 < row["best_gbps"] and row["median_gbps"] <= row["best_gbps"]
    assert set(result["ratios"]) == {"save/dd", "load/read"} and all(r > 0 for r in result["ratios"].values())
    assert len(result["async"]["blocked_s"]) == 2 and result["async"]["steps_slowdown"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the bench's own files are gone
