"""The bundled presets as registry data: every one loads and builds; `unroll info` counts the papers'
sizes (the 7B MoE's total, active, per-layer and state figures are the issue's exact targets)."""

import json

import pytest
import torch

from unroll.launch.cli import main
from unroll.models import LM
from unroll.models.flops import model_flops
from unroll.models.summary import summarize
from unroll.train.config import load_config, preset_names

TINY = ["tiny-gru", "tiny-lstm", "tiny-m2rnn", "tiny-moe", "tiny-transformer"]
SIZES = {  # preset: (low, high) total parameters
    "paragru-1b": (0.9e9, 1.2e9),
    "paralstm-1b": (0.9e9, 1.2e9),
    "paragru-7b": (6.5e9, 7.5e9),
    "paralstm-7b": (6.5e9, 7.5e9),
    "m2rnn-hybrid-400m": (0.38e9, 0.45e9),
    "m2rnn-moe-7b": (6.9e9, 7.0e9),
}


def test_registry_has_tiny_presets_of_every_family_and_the_papers_sizes():
    assert set(TINY) | set(SIZES) <= set(preset_names())
    kinds = {c for name in TINY for c in load_config(name).model.layers}
    assert kinds == {"G", "L", "M", "A"}
    assert any("E" in load_config(name).model.mlp_pattern for name in TINY)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_large_presets_count_their_size(name):
    s = summarize(load_config(name).model)
    low, high = SIZES[name]
    assert low <= s["params_total"] <= high, f"{name}: {s['params_total']:,}"
    assert s["params_active"] <= s["params_total"]


def test_m2rnn_moe_7b_matches_the_paper():
    s = summarize(load_config("m2rnn-moe-7b").model)
    assert 6.9e9 <= s["params_total"] <= 7.0e9, s["params_total"]
    assert 1.26e9 <= s["params_active"] <= 1.29e9, s["params_active"]
    m2rnn = [layer for layer in s["layers"] if layer["mixer"] == "m2rnn"]
    attention = [layer["layer"] for layer in s["layers"] if layer["mixer"] == "attention"]
    assert len(s["layers"]) == 40 and attention == [4, 12, 20, 28, 36]
    assert all(layer["mixer_params"] == 10_178_696 and layer["state_elements"] == 135_168 for layer in m2rnn)
    assert all(layer["mlp"] == "moe" for layer in s["layers"])
    assert s["params_head"] == 100352 * 1536  # untied


def test_summary_counts_agree_with_a_built_model():
    cfg = load_config("tiny-moe").model
    s = summarize(cfg)
    model = LM(cfg)
    assert s["params_total"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.d_model * cfg.moe.hidden
    moe_layers = sum(1 for layer in s["layers"] if layer["mlp"] == "moe")
    assert s["params_total"] - s["params_active"] == moe_layers * (cfg.moe.experts - cfg.moe.top_k) * per_expert


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_train_a_step(name):
    cfg = load_config(name).model
    torch.manual_seed(0)
    model = LM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    aux = model.aux_loss()
    (loss + (aux if aux is not None else 0)).backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_info_cli_prints_a_table_and_json(capsys):
    assert main(["info", "m2rnn-moe-7b"]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "m2rnn" in out and "10,178,696" in out
    assert "training FLOPs per token (forward + backward, sequence 4096" in out and "per iteration" in out
    assert main(["info", "tiny-gru", "model.d_model=64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_active", "layers", "state_elements", "flops"} <= set(data)
    assert data["d_model"] == 64 and data["layers"][0]["state_elements"] == 64
    cfg = load_config("tiny-gru", ["model.d_model=64"])
    assert data["flops"]["per_token"] == model_flops(cfg.model, cfg.data.seq_len).per_token()


def test_info_cli_names_a_bad_key(capsys):
    assert main(["info", "tiny-gru", "model.pattern=GXT"]) == 2
    err = capsys.readouterr().err
    assert "model.pattern" in err and "unknown layer kind(s) ['X']" in err and "T (tnt)" in err
