"""`unroll bench attention` runs its three paths (flex_attention compiled, forward only on CPU) and prints one
row each, the dense mask's bytes against the tile mask's."""

import re

from unroll.launch import cli


def test_the_bench_prints_each_path_with_its_mask_bytes(capsys):
    argv = ["bench", "attention", "--batch", "2", "--seq-len", "256", "--heads", "2", "--kv-heads", "1"]
    argv += ["--head-dim", "16", "--documents", "64", "--dtype", "float32", "--rounds", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {m[1]: m for m in re.finditer(r"^(\S+)\s+[\d.]+/[\d.]+\s+([\d.]+)\s+([\d,]+)$", out, re.M)}
    assert list(rows) == ["causal", "sdpa-mask", "flex-tiles"], out
    assert rows["causal"][2] == "1.00"
    assert int(rows["sdpa-mask"][3].replace(",", "")) == 2 * 256 * 256  # one bool per pair, per row
    assert 0 < int(rows["flex-tiles"][3].replace(",", "")) < 2 * 256 * 256 // 16
