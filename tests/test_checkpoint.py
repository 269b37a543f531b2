"""Checkpoints: an interrupted write is ignored and the previous one used; nothing else is lost."""

import pytest
import torch

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer
from unroll.train.trainer import train


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_checkpoint_interrupted_mid_write_is_ignored(tiny_config, monkeypatch):
    straight = load_config(str(tiny_config("straight")))
    train(straight)

    cfg = load_config(str(tiny_config("crash")))
    real_rng_state = checkpoint._rng_state

    def crash_at_step_12():  # called after DCP has written the model and optimizer shards
        if any(p.name == "step_00000012.tmp" for p in checkpoint.checkpoint_root(cfg.run.dir).iterdir()):
            raise RuntimeError("simulated crash while writing a checkpoint")
        return real_rng_state()

    monkeypatch.setattr(checkpoint, "_rng_state", crash_at_step_12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    partial = root / "step_00000012.tmp"
    assert (partial / ".metadata").is_file()  # the big files were written, the checkpoint was not finished
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [4, 8]
    # a checkpoint directory cut short some other way (a copy, a full disk) is skipped as well
    fake = root / "step_00000010"
    fake.mkdir()
    (fake / ".metadata").write_bytes(b"truncated")
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [4, 8]
    saved_metrics = cfg.run.dir and (root.parent / "metrics.jsonl").read_text()

    monkeypatch.setattr(checkpoint, "_rng_state", real_rng_state)
    summary = train(cfg)
    assert summary["step"] == 12
    assert not partial.exists()  # the next save cleans up what the crash left
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [4, 8, 12]
    assert (root.parent / "metrics.jsonl").read_text().startswith(saved_metrics)  # appended, not lost
    assert losses(cfg.run.dir) == losses(straight.run.dir)  # resumed from step 8, exactly


def test_keep_prunes_oldest_complete_checkpoints(tiny_config):
    cfg = load_config(str(tiny_config("keep", checkpoint={"every": 2, "keep": 2})))
    first = train(cfg)
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [10, 12]
    again = train(cfg)  # a finished run started again trains nothing and says so (tests/test_run_dir.py)
    assert first["step"] == again["step"] == 12 and again["finished"]
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [10, 12]


def test_checkpoint_from_another_model_is_refused_with_its_path(tiny_config):
    cfg = load_config(str(tiny_config("shape")))
    train(cfg)
    bigger = load_config(str(tiny_config("shape", model={"d_model": 48})))
    with pytest.raises(checkpoint.CheckpointError, match="step_00000012"):
        train(bigger)


def test_resume_keeps_moments_by_name_when_the_decay_groups_or_rates_change(tmp_path):
    """A checkpoint saved under other weight-decay groups (an older checkout's rule, or another
    `optim.weight_decay`) resumes with each parameter's Adam moments found by name, and the groups and their
    rates come from the resuming config, not from the checkpoint's group order."""
    old = load_config("tiny-gru", ["model.d_model=32", f"run.dir={tmp_path}", "optim.weight_decay=0.1"])
    torch.manual_seed(0)
    model = LM(old.model)
    params = dict(model.named_parameters())
    # another rule: only the embedding decays, so both groups' membership differs from today's
    rest = [p for n, p in params.items() if n != "embed.weight"]
    saved_groups = [{"params": [params["embed.weight"]], "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(saved_groups, lr=1e-2)
    x = torch.randint(0, old.model.vocab_size, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        model(x).float().logsumexp(-1).mean().backward()
        opt.step()
    checkpoint.save(tmp_path, 2, model, opt, {"step": 2}, keep=1)
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}

    new = load_config("tiny-gru", ["model.d_model=32", f"run.dir={tmp_path}", "optim.weight_decay=0.05"])
    resumed = LM(new.model)
    opt2 = build_optimizer(resumed, new)
    assert checkpoint.load_latest(tmp_path, resumed, opt2)["step"] == 2
    names = {id(p): n for n, p in resumed.named_parameters()}
    for p, n in ((p, names[id(p)]) for g in opt2.param_groups for p in g["params"]):
        assert set(opt2.state[p]) == set(moments[n]), n
        assert all(torch.equal(opt2.state[p][k], v) for k, v in moments[n].items()), n
    decayed = {names[id(p)] for p in opt2.param_groups[0]["params"]}
    assert "blocks.0.mixer.in_proj.weight" in decayed and len(decayed) > 1  # today's rule, not the saved one
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.05, 0.0]
