"""`unroll bench data` runs end to end at a tiny size: prepare (with `bench prepare`'s encode paths), prepare's memory
at two corpus sizes, the loader; the summary holds one row per ratio. No timing is asserted."""

import json

from test_data_loader import SEQ, write_shard

from unroll.launch.cli import main


def test_bench_data_prints_every_ratio_against_its_target(tmp_path, capsys, small_data):
    shard, out = write_shard(str(tmp_path / "s"), 300 * SEQ + 1), tmp_path / "figures.json"
    loader_args = f"--seq-lens {SEQ} --datasets 1,3 --batch 4 --batches 3 --map-samples 1000 --map-indices 500 "
    loader_args += "--table-samples 500 --compute-ms 1 --rounds 2 --threads 1"
    args = [
        "--mb",
        "0.05",
        "--rss-base-mb",
        "0.03",
        "--rss-mb",
        "0.1",
        "--rounds",
        "1",
        "--tokenizer",
        small_data.tokenizer,
    ]
    args += ["--work", str(tmp_path / "work"), "--shard", shard, "--loader-args", loader_args, "--json", str(out)]
    assert main(["bench", "data", *args]) == 0
    printed = capsys.readouterr().out
    assert all(f"== {part}\n" in printed for part in ("prepare", "memory-base", "memory", "loader"))
    figures = json.loads(out.read_text())
    prepare = figures["prepare"]["rows"]
    assert set(prepare) == {"encode", "encode t1", "prepare w1", "prepare w2"}
    assert set(figures["memory"]["rows"]) == set(figures["memory-base"]["rows"]) == {"prepare w2"}  # --no-encode
    assert figures["memory"]["tokens"] > figures["prepare"]["tokens"] > figures["memory-base"]["tokens"] > 0
    whats = [r["what"] for r in figures["summary"]]
    assert sum("per worker" in w for w in whats) == 2 and sum("peak RSS" in w for w in whats) == 2
    assert sum(w.startswith("loader get") for w in whats) == 2 * 2  # get and get_with_starts, 1 and 3 datasets
    assert sum("wait for its batch" in w for w in whats) == 1
    assert all(r["ratio"] > 0 and r["target"][:2] in (">=", "<=") for r in figures["summary"])
    assert printed.count("met   ") + printed.count("MISSED") == len(whats)
