"""`unroll bench zero-offload` end to end on a tiny model (its three 2-rank launches, forked warm: tests/forked_ranks.py):
every path trains, the table and its ratios come from the ranks' figures, and the offloads move what they
should (no figure of the real benchmark is asserted: those are its output)."""

import json

import pytest
from conftest import DEEPSPEED_EXTENSIONS
from forked_ranks import run_forked

from unroll.launch.bench import zero_offload

pytest.importorskip("deepspeed")


def test_bench_zero_offload_quick(tmp_path, capsys, monkeypatch):
    def forked(args, nproc, env, timeout):  # the worker module run as a script: forked_ranks runs scripts
        assert args[:2] == ["-m", zero_offload.__name__]
        return run_forked([zero_offload.__file__, *args[2:]], nproc, env, timeout)

    monkeypatch.setattr(zero_offload, "run_torchrun", forked)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", DEEPSPEED_EXTENSIONS)  # DeepSpeed's JIT ops built once per venv
    out = tmp_path / "rows.json"
    assert zero_offload.main(["--quick", "--timeout", "240", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio ZeRO-3 + CPU optimizer offload / FSDP2" in printed and "peak RSS MiB" in printed
    rows = json.loads(out.read_text())
    assert set(rows) == set(zero_offload.PATHS)
    fsdp, offload, both = (rows[name] for name in zero_offload.PATHS)
    for ranks in rows.values():
        assert len(ranks) == 2 and all(r["peak_rss"] > 0 and len(r["losses"]) == 2 for r in ranks)
    for a, b in zip(fsdp, offload):  # the same model, data and first step on every path
        assert b["losses"][0] == pytest.approx(a["losses"][0], rel=1e-5)
        assert a["offloaded"] == 0 and a["device_state"] > 0
        # ZeRO-3 keeps only its parameter partition on the device; the optimizer side (fp32 master, its
        # gradient, AdamW's moments) is offloaded
        assert b["device_state"] < a["device_state"] and b["offloaded"] > b["device_state"]
    for r in both:  # the parameters offloaded too: nothing of the training state stays on the device
        assert r["device_state"] == 0 and r["offloaded"] > 0
