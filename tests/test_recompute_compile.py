"""Activation checkpointing changes no number: full-block and MLP-only recomputation give the same loss,
gradients and MoE load counts as keeping the activations; per-block torch.compile trains like eager."""

import pytest
import torch

from unroll.models import LM, ModelConfig
from unroll.models.config import M2RNNConfig, MoEConfig
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.parallel.parallelize import apply_activation_checkpointing
from unroll.train.trainer import train

CFG = dict(
    pattern="GAML",
    vocab_size=40,
    d_model=16,
    n_heads=2,
    mlp_pattern="DEDE",
    m2rnn=M2RNNConfig(k_dim=4, v_dim=4, v_heads=4),
    moe=MoEConfig(experts=4, top_k=2, hidden=8),
)


def grads(mode: str):
    torch.manual_seed(0)
    model = LM(ModelConfig(**CFG)).double()
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    (logits.square().mean() + model.aux_loss()).backward()
    loads = [moe.load_since_update.clone() for _, moe in model.moe_layers()]
    return logits, {n: p.grad for n, p in model.named_parameters()}, loads


@pytest.mark.parametrize("mode", ["full", "mlp"])
def test_recomputation_changes_nothing(mode):
    logits, ref, ref_loads = grads("none")
    got_logits, got, loads = grads(mode)
    assert torch.equal(got_logits, logits)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    for a, b in zip(loads, ref_loads):  # the recomputed forward does not count its tokens again
        assert torch.equal(a, b)


def test_compiled_blocks_train_like_eager(tiny_config):
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        cfg = load_config(
            str(
                tiny_config(
                    name, train={"steps": 3, "compile": flag, "activation_checkpoint": "mlp"}, eval={"every": 0}
                )
            )
        )
        train(cfg)
        runs[name] = [r["loss"] for r in read_metrics(cfg.run.dir) if "loss" in r]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)
