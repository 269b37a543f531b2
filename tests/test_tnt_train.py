"""TNT in the trainer: a tiny T model learns; the two-stage recipe runs end to end through `unroll train`
with the bundled tiny-tnt and tiny-tnt-stage2 presets shrunk to tiny settings (stage 2 starts from stage
1's checkpoint, trains only the local memories, saves everything, and resumes from its own checkpoint)."""

import math

import pytest
import torch
from conftest import run_cli, torchrun_train

from unroll.models import LM
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.config import ConfigError, load_config
from unroll.train.lifecycle.inference import load_run
from unroll.train.metrics import read_metrics
from unroll.train.optim import apply_trainable, build_optimizer
from unroll.train.trainer import train

TNT = {"heads": 2, "global_chunk": 16, "local_chunks": [4], "local_reset": 16}


def test_trainer_trains_a_tiny_tnt_model(tiny_config):
    cfg = load_config(str(tiny_config("tnt", model={"pattern": "TA", "tnt": TNT})))
    train(cfg)
    val = [r["val_loss"] for r in read_metrics(cfg.run.dir) if "val_loss" in r]
    assert all(math.isfinite(v) for v in val) and val[-1] < val[0] - 0.3, val


@pytest.mark.parametrize("documents", ["packed", "isolated"])
def test_context_parallel_training_matches_one_process(tiny_config, offline_env, documents):
    """`unroll train` with the sequence split over 2 gloo ranks logs the one-process losses and gradient norms:
    packed, 16 tokens each, fresh local memories on each, the global memory's state handed on; isolated, each
    rank running whole the documents that reach into its slice (tests/test_context.py checks boundaries on and
    near the split in float64)."""
    sections = dict(
        model={"pattern": "TA", "n_heads": 2, "tnt": TNT, "documents": documents},
        train={"steps": 3, "batch_size": 4},
        eval={"every": 3},
    )
    one = load_config(str(tiny_config(f"one-{documents}", **sections)))
    train(one)
    cp = tiny_config(f"cp-{documents}", **sections)
    out = torchrun_train(2, cp, offline_env, "parallel.cp=2")
    assert "cp 2" in out.stdout + out.stderr
    base, rows = read_metrics(one.run.dir), read_metrics(cp.parent / f"cp-{documents}")
    assert [r["step"] for r in rows] == [r["step"] for r in base]
    for ra, rb in zip(base, rows):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=2e-5), (ra["step"], key)


def test_trainable_regex_freezes_the_rest_and_the_optimizer_sees_only_trainable():
    cfg = load_config(
        "tiny-tnt", ["model.d_model=32", "model.n_heads=2", "model.tnt.heads=2", r"train.trainable=mixer\.local_"]
    )
    model = LM(cfg.model)
    n = apply_trainable(model, cfg.train.trainable)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".mixer.local_" in name for name in names)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, cfg)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n
    with pytest.raises(ConfigError, match="train.trainable='nothing_here' matches no parameter"):
        apply_trainable(model, "nothing_here")
    with pytest.raises(ConfigError, match="train.trainable"):
        load_config("tiny-tnt", ["train.trainable=a(b"])


def tiny_overrides(small_data, run_dir, steps):
    return [
        f"run.dir={run_dir}",
        "run.threads=1",
        f"data.train=[{small_data.train}]",
        f"data.valid={small_data.valid}",
        f"data.tokenizer={small_data.tokenizer}",
        f"model.vocab_size={small_data.vocab}",
        "data.seq_len=32",
        "model.d_model=32",
        "model.n_heads=2",
        "model.tnt.heads=2",
        "model.tnt.global_chunk=16",
        "model.tnt.local_reset=16",
        f"train.steps={steps}",
        "train.batch_size=4",
        "train.log_every=1",
        "schedule.warmup_steps=1",
        "eval.every=0",
        "eval.batches=1",
        "eval.batch_size=4",
        "checkpoint.every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        "sample.max_new_tokens=0",
    ]


def test_stage2_starts_from_the_stage1_checkpoint(small_data, offline_env, tmp_path, capsys):
    """Stage 1 in this process (tiny-tnt, local chunks of 8), stage 2 by `unroll train tiny-tnt-stage2`
    (local chunks of 1, init_from stage 1, only the local memories trained), then stage 2 resumed."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train(load_config("tiny-tnt", tiny_overrides(small_data, stage1, 3) + ["model.tnt.local_chunks=[8]"]))
    proc = run_cli(
        ["train", "tiny-tnt-stage2", *tiny_overrides(small_data, stage2, 2), f"train.init_from={stage1}"], offline_env
    )
    head = proc.stdout.splitlines()[0]
    assert f"weights from {stage1}" in head and "trainable (train.trainable='mixer\\\\.local_')" in head, head
    first, _, _ = load_run(stage1)
    second, _, step = load_run(stage2)
    assert step == 2
    assert load_config(str(stage2 / "config.yaml")).model.tnt.local_chunks == [1]
    before, after = dict(first.named_parameters()), dict(second.named_parameters())
    assert before.keys() == after.keys()  # the checkpoint holds the frozen parameters too
    local = [n for n in after if ".mixer.local_" in n]
    assert local and all(torch.equal(before[n], after[n]) for n in after if n not in local)
    assert all(not torch.equal(before[n], after[n]) for n in local if n.endswith("bias") or "init" in n)
    # a later run resumes from stage 2's own checkpoint (init_from no longer applies)
    capsys.readouterr()
    train(load_config("tiny-tnt-stage2", tiny_overrides(small_data, stage2, 3) + [f"train.init_from={stage1}"]))
    assert "resumed at step 2" in capsys.readouterr().out
    assert load_run(stage2)[2] == 3


def test_init_from_names_a_bad_path(small_data, tmp_path):
    cfg = load_config(
        "tiny-tnt-stage2", tiny_overrides(small_data, tmp_path / "s2", 1) + [f"train.init_from={tmp_path / 'nowhere'}"]
    )
    with pytest.raises(CheckpointError, match="train.init_from=.*nowhere: no such run or checkpoint directory"):
        train(cfg)
