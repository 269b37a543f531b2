"""Exact resume: N steps straight equals k steps, SIGKILL, resume, SIGTERM, resume to N — every logged
figure and the final weights and optimizer state bit for bit (CPU, float32). The signals come at known
steps: the runs pause there (UNROLL_PAUSE_AT_STEP) until signalled."""

import signal
import subprocess

import torch
from conftest import UNROLL, run_cli
from paused_run import pause_env, wait_for_pause

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer

STEPS = 30
SECTIONS = dict(train={"steps": STEPS}, checkpoint={"every": 8, "keep": 2}, eval={"every": 10})
# the first run is killed at step 10, past the step-8 checkpoint; the resumed run stops on SIGTERM at step 22
KILLED_AT, LAST_CHECKPOINT_BEFORE_KILL, STOPPED_AT = 10, 8, 22


def start(config, env):
    return subprocess.Popen(
        UNROLL + ["train", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def running(proc):
    return lambda: proc.poll() is None


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
    proc = start(interrupted, pause_env(offline_env, KILLED_AT))
    wait_for_pause(run_dir, KILLED_AT, running=running(proc))  # logged and validated, not yet checkpointed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == KILLED_AT

    proc = start(interrupted, pause_env(offline_env, STOPPED_AT))
    wait_for_pause(run_dir, STOPPED_AT, running=running(proc))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"resumed at step {LAST_CHECKPOINT_BEFORE_KILL}" in err + out  # the steps after it are redone
    assert f"stopped by signal {int(signal.SIGTERM)} at step {STOPPED_AT}" in out + err
    assert max(step for step, _ in resolve.complete_checkpoints(run_dir)) == STOPPED_AT

    proc = run_cli(["train", interrupted], offline_env)
    assert f"resumed at step {STOPPED_AT}" in proc.stdout + proc.stderr

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
