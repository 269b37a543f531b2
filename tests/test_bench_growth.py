"""`unroll bench growth` at toy size: it runs the three trainings, and every printed figure is the one the
runs' own metrics give (recomputed here from their metrics.jsonl)."""

import json
import re

from conftest import run_cli

from unroll.launch.bench.growth import growth_ratios, tokens_to_reach
from unroll.train.metrics import read_metrics


def test_tokens_to_reach_interpolates_between_validations():
    curve = [(0, 6.0), (100, 5.0), (200, 4.0)]
    assert tokens_to_reach(curve, 4.5) == 150
    assert tokens_to_reach(curve, 6.5) == 0 and tokens_to_reach(curve, 4.0) == 200
    assert tokens_to_reach(curve, 3.9) is None


def test_growth_ratios_say_why_there_is_none():
    # scratch reached its target at 600 tokens, G_stack at 300 (200 of them the small model's, half the size)
    ratio, compute, why = growth_ratios(600.0, 300.0, n_small=50, n_big=100, small_tokens=200)
    assert (ratio, why) == (2.0, None) and compute == 6 * 100 * 600 / (6 * (50 * 200 + 100 * 100))
    assert growth_ratios(600.0, None, 50, 100, 200) == (None, None, "G_stack did not reach the target")
    # the stacked curve starts at the target: scratch learnt nothing (once a ZeroDivisionError)
    assert growth_ratios(600.0, 0.0, 50, 100, 200)[:2] == (None, None)
    assert "train longer" in growth_ratios(600.0, 0.0, 50, 100, 200)[2]


def test_bench_growth_reports_measured_tokens_and_ratio(small_data, offline_env, tmp_path):
    work, out = tmp_path / "work", tmp_path / "growth.json"
    proc = run_cli(
        [
            "bench",
            "growth",
            "--work",
            work,
            "--train",
            small_data.train,
            "--valid",
            small_data.valid,
            "--tokenizer",
            small_data.tokenizer,
            "--pattern",
            "GA",
            "--factor",
            "2",
            "--d-model",
            "16",
            "--seq-len",
            "16",
            "--batch",
            "4",
            "--small-steps",
            "6",
            "--grown-steps",
            "6",
            "--eval-every",
            "2",
            "--eval-batches",
            "2",
            "--lr",
            "1e-2",
            "--warmup",
            "1",
            "--json",
            out,
        ],
        offline_env,
    )
    r = json.loads(out.read_text())
    per_step = 4 * 16

    def curve(name, offset=0):
        return [
            (offset + row["step"] * per_step, row["val_loss"]) for row in read_metrics(work / name) if "val_loss" in row
        ]

    scratch, small = curve("scratch"), curve("small")
    grown = curve("stacked", offset=6 * per_step)
    assert grown[0][0] == small[-1][0]  # the grown run validates at its step 0, where the small run ended
    stacked = small + grown[1:]
    assert [t for t, _ in scratch] == [i * 2 * per_step for i in range(7)]  # steps 0, 2, ..., 12
    assert [t for t, _ in stacked] == [i * 2 * per_step for i in range(7)]
    target = scratch[-1][1]
    assert r["target_val_loss"] == target and r["grown_pattern"] == "GAGA"
    assert r["tokens_scratch"] == tokens_to_reach(scratch, target)
    assert r["tokens_stacked"] == tokens_to_reach(stacked, target)

    text = proc.stdout
    assert "G_stack growth vs scratch: 'GA' ×2 → 'GAGA'" in text
    assert re.search(rf"scratch\s+12\s+768\s+{target:.4f}", text)
    assert re.search(rf"stacked\s+6 \+ 6\s+768\s+{stacked[-1][1]:.4f}", text)
    assert f"tokens to reach it: scratch {r['tokens_scratch']:,.0f}, G_stack " in text
    if r["tokens_stacked"] is None:
        assert r["ratio"] is None and "ratio (scratch / G_stack tokens): n/a" in text
    else:
        assert r["ratio"] == r["tokens_scratch"] / r["tokens_stacked"]
        assert f"ratio (scratch / G_stack tokens): {r['ratio']:.3f}" in text
