"""G_stack growth: block i of the grown model is the source's block i mod L bit for bit (every mixer kind,
dense and MoE MLPs, stage marks), embedding/norm/head copied, a fresh optimizer, and `unroll train`
continues from the grown run directory; the paper's growth-timing figures; bad input named."""

import math

import pytest
import torch
from conftest import torchrun_train

from unroll.launch import cli
from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.config import ConfigError, load_config
from unroll.train.lifecycle.grow import (
    fresh_adamw_state,
    grow,
    grow_pattern,
    grown_model_config,
    growth_tokens,
    parse_count,
)
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer
from unroll.train.trainer import train

HYBRID = {
    "pattern": "GL|MA",
    "mlp_pattern": "DE|ED",
    "tie_embeddings": False,
    "rope": False,
    "m2rnn": {"k_dim": 8, "v_dim": 8, "v_heads": 4},
    "moe": {"experts": 4, "top_k": 2, "hidden": 32, "shared_experts": 1, "bias_update_rate": 0.01},
}


def weights(run_or_ckpt, cfg_model, step_dir=None):
    model = LM(cfg_model)
    path = step_dir or resolve.complete_checkpoints(run_or_ckpt)[-1][1]
    checkpoint.load_model_weights(path, model)
    return model.state_dict()


def assert_stacked(src: dict, grown: dict, n_layers: int, factor: int) -> None:
    for key, value in grown.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            assert int(i) < n_layers * factor
            ref = src[f"blocks.{int(i) % n_layers}.{rest}"]
        else:
            ref = src[key]
        assert torch.equal(value, ref), key
    blocks = {int(k.split(".")[1]) for k in grown if k.startswith("blocks.")}
    assert blocks == set(range(n_layers * factor))


def test_patterns_repeat_with_stage_marks():
    assert grow_pattern("GA", 3) == "GAGAGA"
    assert grow_pattern("GL|MA", 2) == "GL|MA|GL|MA"
    cfg = load_config(None, ["model.pattern=GL|MA", "model.mlp_pattern=DE|ED"]).model
    grown = grown_model_config(cfg, 2)
    assert grown.layers == list("GLMAGLMA") and grown.mlp_kinds == list("DEEDDEED")
    assert grown_model_config(load_config(None, ["model.mlp_pattern=E"]).model, 4).mlp_pattern == "E"


def test_grow_hybrid_moe_copies_blocks_and_trains_on(tiny_config, capsys):
    src_cfg = load_config(str(tiny_config("small", model=HYBRID, train={"steps": 4})))
    train(src_cfg)
    out = src_cfg.run.dir.replace("small", "grown")
    assert cli.main(["grow", src_cfg.run.dir, "--factor", "3", "--out", out, "train.steps=6"]) == 0
    assert "'GL|MA' → 'GL|MA|GL|MA|GL|MA'" in capsys.readouterr().out

    cfg = load_config(f"{out}/config.yaml")
    assert cfg.model.pattern == "GL|MA|GL|MA|GL|MA" and cfg.model.mlp_pattern == "DE|ED|DE|ED|DE|ED"
    assert cfg.run.dir == out and cfg.train.steps == 6
    src = weights(src_cfg.run.dir, src_cfg.model)
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in src.items())  # trained, not zeros
    assert "head.weight" in src
    assert_stacked(src, weights(out, cfg.model), 4, 3)

    # the grown checkpoint: step 0, data continuing after the source's samples, AdamW at its initial state
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    state = checkpoint.load_latest(out, model, optimizer)
    assert state["step"] == 0 and state["samples_consumed"] == 4 * 4 and state["grown_from"]["factor"] == 3
    for s in optimizer.state.values():
        assert s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
    # ... which takes exactly the step a brand-new AdamW takes
    fresh_model = LM(cfg.model)
    fresh_model.load_state_dict(model.state_dict())
    fresh = build_optimizer(fresh_model, cfg)
    batch = torch.randint(0, cfg.model.vocab_size, (2, 9))
    for m, opt in ((model, optimizer), (fresh_model, fresh)):
        logits = m(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name

    capsys.readouterr()
    summary = train(cfg)  # `unroll train OUT/config.yaml`
    assert summary["step"] == 6
    first = capsys.readouterr().out.splitlines()[0]
    assert "; starts from a grown checkpoint (4 → 12 layers, G_stack ×3 of " in first and "resumed" not in first
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r][0] == 0  # its loss before any step
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in rows] == [(16 + 4 * s) * 32 for s in range(1, 7)]  # data continues
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert rows[0]["lr"] == pytest.approx(3e-3 / 3)  # warmup again (schedule.warmup_steps=3)
    assert [s for s, _ in resolve.complete_checkpoints(out)][-1] == 6


@pytest.mark.parametrize("layout", ["parallel.dp_shard=2", "parallel.tp=2"])  # tp: vocabulary-split embedding
def test_grow_a_two_rank_fsdp_or_tp_checkpoint(tiny_config, offline_env, layout):
    config = tiny_config("two", train={"steps": 4}, checkpoint={"every": 4})
    torchrun_train(2, config, offline_env, layout)
    src_cfg = load_config(str(config))
    step4 = resolve.complete_checkpoints(src_cfg.run.dir)[-1][1]
    out = src_cfg.run.dir + "-grown"
    grow(step4, 2, out)
    cfg = load_config(f"{out}/config.yaml")
    assert cfg.model.pattern == "GAGA"
    assert_stacked(weights(None, src_cfg.model, step4), weights(out, cfg.model), 2, 2)


def test_growth_timing_reproduces_the_papers_figures(capsys):
    for n, d, expected in [("8B", "15T", 6.58), ("7B", "2T", 11.11), ("13B", "2T", 15.84), ("70B", "2T", 42.48)]:
        tokens = growth_tokens(parse_count(n, "N"), parse_count(d, "D"))
        assert round(tokens / 1e9, 2) == expected, (n, d, tokens)
    assert parse_count("7e9", "N") == parse_count("7B", "N") == parse_count("7000000000", "N") == 7e9
    assert parse_count("2t", "D") == 2e12
    assert cli.main(["grow", "--plan", "--params", "7e9", "--tokens", "2T"]) == 0
    out = capsys.readouterr().out
    assert "d = 11.11B tokens" in out and "g = 4" in out


def test_bad_input_is_named(tiny_config, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--factor must be an integer >= 2"):
        grow(tmp_path, 1, tmp_path / "out")
    with pytest.raises(CheckpointError, match="nowhere: no such run or checkpoint directory"):
        grow(tmp_path / "nowhere", 2, tmp_path / "out")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        grow(tmp_path, 2, tmp_path / "out")
    with pytest.raises(ConfigError, match="--params: cannot read '7X'"):
        parse_count("7X", "--params")
    assert cli.main(["grow", str(tmp_path / "nowhere"), "--factor", "2", "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: no such run or checkpoint directory" in capsys.readouterr().err
    assert cli.main(["grow", str(tmp_path), "--factor", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--factor must be an integer >= 2 (the depth multiple), got 0" in capsys.readouterr().err

    src = load_config(str(tiny_config("src", train={"steps": 4})))
    train(src)
    with pytest.raises(CheckpointError, match="already holds a run"):
        grow(src.run.dir, 2, src.run.dir)
    with pytest.raises(ConfigError, match="change the grown model"):
        grow(src.run.dir, 2, tmp_path / "g", ["model.d_model=64"])
    grow(src.run.dir, 2, tmp_path / "g", ["model.pattern=G|AGA"])  # stage marks elsewhere: the same model
    assert load_config(str(tmp_path / "g" / "config.yaml")).model.pattern == "G|AGA"


def test_fresh_adamw_state_leaves_weights_alone():
    model = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.5)
    fresh_adamw_state(opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(s["step"].item() == 0 for s in opt.state.values()) and opt.param_groups[0]["lr"] == 1.0
