"""Exact resume: N steps straight equals k steps, SIGKILL, resume, SIGTERM, resume to N — every logged
figure and the final weights and optimizer state bit for bit (CPU, float32)."""

import signal
import subprocess
import time

import torch
from conftest import UNROLL, run_cli

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer

STEPS = 60
SECTIONS = dict(train={"steps": STEPS}, checkpoint={"every": 8, "keep": 2}, eval={"every": 10})


def start(config, env):
    return subprocess.Popen(
        UNROLL + ["train", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(run_dir, proc, at_least: int, timeout: float = 120) -> int:
    """Polls metrics.jsonl until a training row with step >= at_least appears; returns that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        if steps and max(steps) >= at_least:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError(f"no step {at_least} within {timeout} s")


def final_state(config):
    cfg = load_config(str(config))
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    state = checkpoint.load_latest(cfg.run.dir, model, optimizer)
    return state, model.state_dict(), optimizer.state_dict()["state"]


def test_exact_resume_after_sigkill_and_sigterm(tiny_config, offline_env):
    straight = tiny_config("straight", **SECTIONS)
    run_cli(["train", straight], offline_env)

    interrupted = tiny_config("interrupted", **SECTIONS)
    run_dir = interrupted.parent / "interrupted"
    proc = start(interrupted, offline_env)
    wait_for_step(run_dir, proc, 10)  # past the first checkpoint (step 8)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-log or mid-checkpoint
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert killed_at < STEPS

    proc = start(interrupted, offline_env)
    resumed = wait_for_step(run_dir, proc, killed_at + 12)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "resumed at step" in err + out
    stopped_at = max(step for step, _ in checkpoint.complete_checkpoints(run_dir))
    assert resumed <= stopped_at < STEPS  # the SIGTERM checkpoint is the step it stopped at
    assert f"stopped by signal {int(signal.SIGTERM)} at step {stopped_at}" in out + err

    run_cli(["train", interrupted], offline_env)

    a, b = read_metrics(interrupted.parent / "straight"), read_metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert len([r for r in a if "loss" in r]) == STEPS and any("val_loss" in r for r in a)
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "val_loss", "tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))

    state_a, model_a, optim_a = final_state(straight)
    state_b, model_b, optim_b = final_state(interrupted)
    assert state_a["step"] == state_b["step"] == STEPS
    assert state_a["samples_consumed"] == state_b["samples_consumed"] == STEPS * 4
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    for pid in optim_a:
        for key in optim_a[pid]:
            assert torch.equal(optim_a[pid][key], optim_b[pid][key]), (pid, key)
