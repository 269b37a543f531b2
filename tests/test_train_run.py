"""A training run end to end: gradient accumulation, generation, plot, wandb offline, data parallel."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, torchrun_train

from unroll.launch.cli import main
from unroll.models.flops import model_flops
from unroll.models.generate import sample
from unroll.train.config import load_config
from unroll.train.lifecycle.inference import load_run
from unroll.train.metrics import read_metrics
from unroll.train.trainer import train


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    whole = load_config(str(tiny_config("whole", train={"batch_size": 8, "steps": 6})))
    accum = load_config(str(tiny_config("accum", train={"batch_size": 8, "micro_batch_size": 2, "steps": 6})))
    train(whole), train(accum)
    a, b = train_losses(whole.run.dir), train_losses(accum.run.dir)
    assert len(a) == 6
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)  # same samples, summed in another order


def test_bf16_autocast_trains(tiny_config):
    cfg = load_config(str(tiny_config("bf16", run={"dtype": "bfloat16"})))
    summary = train(cfg)
    val = [r["val_loss"] for r in read_metrics(cfg.run.dir) if "val_loss" in r]
    assert all(math.isfinite(v) for v in val) and val[-1] < val[0] - 0.3
    assert summary["val_loss"] == val[-1]


def test_newton_solver_metrics_are_logged(tiny_config):
    train_section = {"steps": 4, "peak_tflops": 0.5}
    cfg = load_config(str(tiny_config("newton", model={"pattern": "GL", "solver": "newton"}, train=train_section)))
    train(cfg)
    rows = [r for r in read_metrics(cfg.run.dir) if "loss" in r]
    for layer in (0, 1):
        iters = [r[f"layer{layer}/newton_iters"] for r in rows]
        assert all(1 <= i <= 6 for i in iters), iters
        assert all(r[f"layer{layer}/newton_residual"] <= 5e-6 for r in rows)
        assert all(r[f"layer{layer}/newton_fallbacks"] == 0 and r[f"layer{layer}/newton_damped"] == 0 for r in rows)
    # model FLOPs per second per rank at the iterations the step took; mfu against train.peak_tflops
    flops = model_flops(cfg.model, cfg.data.seq_len)
    for r in rows:
        per_token = flops.per_token({0: r["layer0/newton_iters"], 1: r["layer1/newton_iters"]})
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5)


def test_no_mfu_is_logged_without_a_peak(tiny_config):
    """A CPU has no entry in the peak table (train/mfu.py): achieved TFLOP/s are logged, no utilisation."""
    cfg = load_config(str(tiny_config("cpu", run={"device": "cpu", "threads": 1}, train={"steps": 2})))
    train(cfg)
    rows = [r for r in read_metrics(cfg.run.dir) if "loss" in r]
    assert rows and all(r["tflops_per_gpu"] > 0 and "mfu" not in r for r in rows)


def test_generate_plot_and_wandb_offline(tiny_config, capsys):
    cfg = load_config(
        str(tiny_config("gen", logging={"wandb": "offline"}, sample={"prompt": "KING.", "max_new_tokens": 20}))
    )
    summary = train(cfg)
    run_dir = Path(cfg.run.dir)
    assert summary["sample"].startswith("KING.") and len(summary["sample"]) > len("KING.")
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[1]) and "val_loss" in rows[0]

    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "KING.", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("KING.")
    (run_dir / "loss.png").unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "loss.png").is_file()

    # sampling with the KV cache / recurrent state equals re-running the whole sequence every token
    model, tok, step = load_run(run_dir)
    assert step == 12
    prompt = tok.encode("KING.")
    fast = sample(model, prompt, 15, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert fast == ids[len(prompt) : len(prompt) + len(fast)] and len(fast) > 0


def test_two_data_parallel_ranks_match_one_process(tiny_config, offline_env):
    one = tiny_config("one", train={"steps": 6, "batch_size": 8})
    two = tiny_config("two", train={"steps": 6, "batch_size": 8})
    run_cli(["train", one], offline_env)
    torchrun_train(2, two, offline_env)
    a, b = read_metrics(one.parent / "one"), read_metrics(two.parent / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    state = json.loads((two.parent / "two/checkpoints/step_00000006/train_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_consumed"] == 48
    # and the 2-rank checkpoint resumes in one process
    run_cli(["train", two, "train.steps=8"], offline_env)
    assert len(train_losses(two.parent / "two")) == 8


@pytest.mark.slow
def test_shortened_default_run_lowers_validation_perplexity(offline_env, tmp_path):
    """The README's default (tiny-gru on the bundled corpus), shortened: validation perplexity must fall
    far below its initial value (≈ the vocabulary size for an untrained model)."""
    data = tmp_path / "data"
    made = [
        run_cli(
            ["data", "tokenizer", "--input", "bundled:shakespeare", "--vocab-size", "2048", "--out", data / "sp"],
            offline_env,
        ),
        run_cli(
            [
                "data",
                "prepare",
                "--input",
                "bundled:shakespeare",
                "--tokenizer",
                data / "sp.model",
                "--out",
                data / "shards",
            ],
            offline_env,
        ),
    ]
    for proc in made:  # the bundled corpus is read offline: nothing may say it is downloading
        assert "reading 42 file(s) of bundled:shakespeare" in proc.stderr
        assert "Downloading" not in proc.stdout + proc.stderr
    env = dict(offline_env, OMP_NUM_THREADS="2")
    proc = run_cli(
        [
            "train",
            "tiny-gru",
            f"run.dir={tmp_path / 'run'}",
            f"data.tokenizer={data / 'sp.model'}",
            f"data.train=[{data / 'shards/train'}]",
            f"data.valid={data / 'shards/valid'}",
            "train.steps=60",
            "schedule.warmup_steps=10",
            "eval.every=0",
            "checkpoint.every=0",
            "logging.wandb=disabled",
        ],
        env,
        timeout=900,
    )
    val = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    initial, final = val[0]["val_ppl"], val[-1]["val_ppl"]
    print(f"validation perplexity {initial:.1f} -> {final:.1f} after 60 steps")
    assert initial > 1000 and final < initial / 4
    assert "validation perplexity after 60 steps" in proc.stdout + proc.stderr
    assert "--- sample ---\nROMEO." in proc.stdout + proc.stderr
    assert math.isfinite(final)
