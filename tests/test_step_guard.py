"""Steps not applied (train/step_guard.py): a non-finite loss or gradient norm is skipped, a loss spike is
skipped or rolled back to the newest checkpoint with its data window left behind, the guard's figures resume
exactly, and a diverging run stops with its checkpoints kept."""

import math
import os

import pytest
import torch
from conftest import run_cli, torchrun_train

from unroll.models import LM
from unroll.train import loss as training_loss
from unroll.train import trainer
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer
from unroll.train.step_guard import StepGuard, TrainingDiverged, Verdict
from unroll.train.trainer import train


def test_guard_judges_non_finite_figures_and_spikes_over_a_full_window():
    guard = StepGuard(max_bad_steps=3, spike_factor=2.0, spike_window=3)
    assert guard.judge(math.nan, 1.0).reason == "loss is nan"
    assert guard.judge(1.0, math.inf).reason == "gradient norm is inf"
    assert guard.judge(100.0, 1.0) is None  # no verdict on spikes before the window is full
    for step, loss in enumerate([4.0, 3.0, 9.0], start=1):
        guard.applied(step, loss)
    assert guard.judge(8.0, 1.0) is None  # 8 ≤ 2 × median(4, 3, 9) = 8
    spike = guard.judge(8.01, 1.0)
    assert spike.action == "skip" and "8.0100 > 2 × 4.0000" in spike.reason


def test_guard_stops_after_max_bad_steps_in_a_row_and_a_rollback_does_not_reset_the_count():
    guard = StepGuard(max_bad_steps=3, spike_factor=2.0, spike_window=2, spike_policy="rollback")
    bad = Verdict("loss is nan", "skip")
    guard.applied(1, 1.0)
    guard.rejected(2, bad)
    guard.applied(3, 1.0)  # past the furthest step: the count starts again
    guard.rejected(4, bad)
    guard.rolled_back({"recent": [1.0]})
    guard.applied(2, 1.0)  # a step redone after the rollback is not progress
    guard.rejected(4, bad)
    with pytest.raises(
        TrainingDiverged,
        match=r"3 steps in a row not applied \(train.max_bad_steps=3\), "
        r"from step 4 to step 5; the last: loss is nan",
    ):
        guard.rejected(5, bad)
    restored = StepGuard(max_bad_steps=3, spike_window=2)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() and guard.skipped == 4 and guard.rollbacks == 1


class NanGradient(torch.autograd.Function):
    """The loss unchanged, every gradient behind it NaN: a fault in the backward only."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


def inject(monkeypatch, faults: dict[int, str]):
    """faults: first sample index of a step → "nan_grad" or "spike" (the loss ×50, so are its gradients).
    Returns the list of (first sample, model weights before the step) the run went through."""
    seen, step_fn, loss_fn, current = [], trainer.train_step, training_loss.lm_loss, [None]

    def train_step(t, cfg, batches, first, *args, **kwargs):
        seen.append((first, {k: v.clone() for k, v in t.owned.state_dict().items()}))
        current[0] = faults.get(first)
        return step_fn(t, cfg, batches, first, *args, **kwargs)

    def lm_loss(*args):
        loss = loss_fn(*args)
        if current[0] == "nan_grad":
            return NanGradient.apply(loss)
        return loss * 50 if current[0] == "spike" else loss

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(training_loss, "lm_loss", lm_loss)
    return seen


def rows(run_dir, kind=None):
    return [r for r in read_metrics(run_dir) if (r.get("event") == kind if kind else "loss" in r and "event" not in r)]


def newest(cfg):
    """(train state, model, optimizer) of the run's newest checkpoint."""
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    return checkpoint.load_latest(cfg.run.dir, model, optimizer), model, optimizer


def adam_steps(cfg) -> set[int]:
    _, model, optimizer = newest(cfg)
    for t in model.state_dict().values():
        assert torch.isfinite(t).all()
    return {int(s["step"]) for s in optimizer.state_dict()["state"].values()}


BATCH = 4  # tiny_config's train.batch_size: step k (1-based) reads samples 4(k-1) ...


MOE = {
    "pattern": "MA",
    "mlp_pattern": "E",
    "n_heads": 2,
    "rope": False,
    "m2rnn": {"k_dim": 8, "v_dim": 4, "v_heads": 8},
    "moe": {"experts": 4, "top_k": 2, "hidden": 16, "bias_update_rate": 0.01},
}


@pytest.mark.parametrize("model", [{}, MOE], ids=["gru_attention", "m2rnn_moe"])
def test_a_nan_gradient_is_not_applied_and_training_goes_on(model, tiny_config, monkeypatch, capsys):
    clean = load_config(str(tiny_config("clean", model=model)))
    train(clean)
    cfg = load_config(str(tiny_config("nan", model=model)))
    seen = inject(monkeypatch, {BATCH * 5: "nan_grad"})  # step 6
    train(cfg)
    assert "step 6 not applied (gradient norm is nan): skipped, 1 so far" in capsys.readouterr().out
    (event,) = rows(cfg.run.dir, "step_not_applied")
    assert event["step"] == 6 and event["action"] == "skip" and math.isfinite(event["loss"])
    before = {r["step"]: r["loss"] for r in rows(clean.run.dir)}
    after = {r["step"]: r for r in rows(cfg.run.dir)}
    assert [after[s]["loss"] for s in range(1, 6)] == [before[s] for s in range(1, 6)]
    assert 6 not in after and after[12]["skipped_steps"] == 1
    assert seen[6][1].keys() == seen[5][1].keys()
    # weights (and a MoE's expert biases) untouched by step 6
    assert all(torch.equal(seen[6][1][k], seen[5][1][k]) for k in seen[5][1])
    biases = [k for k in seen[5][1] if "expert_bias" in k]
    assert bool(biases) == bool(model) and all(not torch.equal(seen[5][1][k], seen[4][1][k]) for k in biases)
    assert adam_steps(cfg) == {11}  # 12 steps, 11 applied


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_a_loss_spike_is_skipped_or_rolled_back_and_resumes_exactly(policy, tiny_config, monkeypatch, capsys):
    spike = dict(
        train={"spike_factor": 3.0, "spike_window": 3, "spike_policy": policy, "steps": 16},
        checkpoint={"every": 4, "keep": 10},
    )
    straight = load_config(str(tiny_config("straight", **spike)))
    seen = inject(monkeypatch, {BATCH * 9: "spike"})  # step 10; the newest checkpoint then is step 8
    train(straight)
    out = capsys.readouterr().out
    (event,) = rows(straight.run.dir, "step_not_applied")
    assert event["step"] == 10 and event["action"] == policy and "loss spike" in event["reason"]
    firsts = [first for first, _ in seen]
    assert firsts == sorted(set(firsts))  # no sample trained on twice
    if policy == "skip":
        assert firsts == [BATCH * i for i in range(16)]
    else:
        assert "step 10 not applied" in out and "rolled back to step 8; samples 32-39" in out
        (back,) = rows(straight.run.dir, "rollback")
        assert back["to_step"] == 8 and back["samples_skipped"] == [BATCH * 8, BATCH * 10]
        assert firsts == [BATCH * i for i in range(10)] + [BATCH * i for i in range(10, 18)]
        # the step after the rollback starts from the weights of checkpoint 8
        saved = LM(straight.model)
        checkpoint.load_model_weights(checkpoint.checkpoint_root(straight.run.dir) / "step_00000008", saved)
        after = seen[10][1]
        assert all(torch.equal(after[k], v) for k, v in saved.state_dict().items())
        assert max(r["step"] for r in rows(straight.run.dir)) == 16

    # The same run dies after its checkpoint at step 12 and is resumed: the same losses, the same guard.
    crashed = load_config(str(tiny_config("crashed", **spike)))
    crash_step, n = trainer.train_step, [0]

    def dies_after_checkpoint_12(t, cfg, batches, first, *args, **kwargs):
        n[0] += 1
        if n[0] == (13 if policy == "skip" else 15):  # a rollback redid steps 9 and 10
            raise RuntimeError("crash")
        return crash_step(t, cfg, batches, first, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_after_checkpoint_12)
    with pytest.raises(RuntimeError, match="crash"):
        train(crashed)
    monkeypatch.setattr(trainer, "train_step", crash_step)
    train(crashed)
    assert "resumed at step 12" in capsys.readouterr().out
    assert {r["step"]: r["loss"] for r in rows(crashed.run.dir)} == {
        r["step"]: r["loss"] for r in rows(straight.run.dir)
    }
    assert newest(crashed)[0]["guard"] == newest(straight)[0]["guard"]


def test_a_diverging_run_stops_with_its_checkpoints_and_plot(tiny_config, offline_env):
    config = tiny_config("diverging", optim={"lr": 1000.0}, train={"steps": 40, "max_bad_steps": 3})
    proc = run_cli(["train", config, "checkpoint.every=2"], offline_env, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "steps in a row not applied (train.max_bad_steps=3)" in proc.stderr
    run_dir = config.parent / "diverging"
    events = rows(run_dir, "step_not_applied")
    assert len(events) >= 3 and (run_dir / "loss.png").is_file()
    saved = resolve.complete_checkpoints(run_dir)
    assert saved and all(step < events[-3]["step"] for step, _ in saved)  # none of a step not applied
    _, model, _ = newest(load_config(str(config)))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


# Loaded by every rank through PYTHONPATH: rank 1's gradients of its 5th step turn NaN (its loss stays
# finite); every rank counts the optimizer steps it really takes.
NAN_ON_RANK_1 = """
import math, os
import torch
import unroll.train.loss as training_loss

class NanGradient(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * math.nan)

calls, loss_fn, adam_step = [0], training_loss.lm_loss, torch.optim.AdamW.step

def lm_loss(*args):
    calls[0] += torch.is_grad_enabled()  # training forwards only, not validation
    loss = loss_fn(*args)
    return NanGradient.apply(loss) if os.environ["RANK"] == "1" and calls[0] == 5 else loss

def step(self, *args, **kwargs):
    with open(os.path.join(os.environ["COUNTS"], "rank" + os.environ["RANK"]), "a") as f:
        f.write("step\\n")
    return adam_step(self, *args, **kwargs)

training_loss.lm_loss, torch.optim.AdamW.step = lm_loss, step
"""


def test_a_nan_in_one_ranks_gradient_is_skipped_by_both_fsdp_ranks(tiny_config, offline_env, tmp_path):
    hook, counts = tmp_path / "hook", tmp_path / "counts"
    hook.mkdir(), counts.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    env = dict(
        offline_env,
        COUNTS=str(counts),
        PYTHONPATH=os.pathsep.join(p for p in (str(hook), offline_env.get("PYTHONPATH")) if p),
    )
    clean = tiny_config("clean", eval={"every": 0})
    torchrun_train(2, clean, offline_env, "parallel.dp_shard=2")
    faulty = tiny_config("faulty", eval={"every": 0})
    proc = torchrun_train(2, faulty, env, "parallel.dp_shard=2")
    assert "step 5 not applied (gradient norm is nan): skipped, 1 so far" in proc.stdout, proc.stdout
    assert [len((counts / f"rank{r}").read_text().split()) for r in (0, 1)] == [11, 11]  # 12 steps, one skipped
    before = {r["step"]: r["loss"] for r in rows(clean.parent / "clean")}
    after = {r["step"]: r for r in rows(faulty.parent / "faulty")}
    assert [after[s]["loss"] for s in range(1, 5)] == [before[s] for s in range(1, 5)]
    assert 5 not in after and after[12]["skipped_steps"] == 1 and math.isfinite(after[12]["loss"])
    assert adam_steps(load_config(str(faulty))) == {11}  # resharded into one process: finite, 11 applied
