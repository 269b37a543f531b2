"""`unroll bench loader` runs end to end with tiny settings: both orders' reads, the Feistel map's cost, the
prefetch waits (no timing is asserted)."""

import json

from test_data_loader import SEQ, write_shard

from unroll.launch.cli import main


def test_bench_loader_prints_every_figure(tmp_path, capsys):
    shard, out = write_shard(str(tmp_path / "s"), 300 * SEQ + 1), tmp_path / "figures.json"
    args = ["--shard", shard, "--seq-lens", f"{SEQ},{2 * SEQ}", "--datasets", "1,3", "--batch", "4", "--batches", "3"]
    args += ["--map-samples", "1000", "--map-indices", "500", "--table-samples", "500", "--compute-ms", "1"]
    assert main(["bench", "loader", *args, "--rounds", "2", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "machine: load average" in printed and "feistel map over 1,000 samples" in printed
    assert "without prefetch" in printed and "with data.prefetch=2" in printed
    figures = json.loads(out.read_text())
    assert [(r["seq_len"], r["datasets"]) for r in figures["get"]] == [(SEQ, 1), (SEQ, 3), (2 * SEQ, 1), (2 * SEQ, 3)]
    paths = ("feistel", "numpy-permutation", "feistel+starts", "memmap")
    assert all(r[path] > 0 for r in figures["get"] for path in paths)
    assert figures["map"]["table_bytes_at_map_samples"] == 8000
    assert [r["seq_len"] for r in figures["prefetch"]] == [SEQ, 2 * SEQ]
