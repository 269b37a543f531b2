"""`unroll import` / `unroll generate` inputs: a model with fewer vocabulary rows than its tokenizer has ids is
refused with one line; transformers' router_aux_loss_coef maps to moe.aux_loss_coef both ways (the same loss);
an import of a run that reached its train.steps writes and prints a command that trains."""

import json
import re
import shutil

import pytest
import torch
from conftest import run_cli
from test_export import ATTENTION, MOE, saved_run, transformers  # noqa: F401 (transformers is a fixture)

from unroll.data.tokenizer import Tokenizer
from unroll.train.config import load_config
from unroll.train.lifecycle.export import export, import_export
from unroll.train.lifecycle.export_format import read_export
from unroll.train.metrics import read_metrics

PROMPT = "To be, or not to be, that is the question"


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def test_import_and_generate_refuse_a_vocabulary_smaller_than_the_tokenizer(tiny_config, tmp_path, offline_env):
    _, cfg = saved_run(tiny_config, "small_vocab", {**ATTENTION, "pattern": "AA", "vocab_size": 300})
    tokenizer = Tokenizer(cfg.data.tokenizer)
    assert tokenizer.vocab_size == 320 and max(tokenizer.encode(PROMPT)) >= 300  # unchecked: an IndexError
    export(cfg.run.dir, tmp_path / "hf")
    export(cfg.run.dir, tmp_path / "own", fmt="unroll")
    cases = [  # (source, the file and key named)
        (tmp_path / "hf", f"{tmp_path / 'hf' / 'config.json'}: vocab_size 300"),
        (tmp_path / "own", f"{tmp_path / 'own' / 'unroll_config.yaml'}: model.vocab_size 300"),
    ]
    for source, named in cases:
        message = one_line_error(run_cli(["import", source, "--out", tmp_path / "run"], offline_env, check=False))
        assert named in message and f"320 tokens of the tokenizer {source / 'tokenizer.model'}" in message, message
        assert not (tmp_path / "run").exists()
        message = one_line_error(run_cli(["generate", source, "--prompt", PROMPT], offline_env, check=False))
        assert named in message and "ids 300-319 have no embedding row" in message, message
    run_dir = cfg.run.dir
    message = one_line_error(run_cli(["generate", run_dir, "--prompt", PROMPT], offline_env, check=False))
    assert (
        f"{run_dir}/config.yaml: model.vocab_size 300 is smaller than the 320 tokens of the tokenizer "
        f"{run_dir}/tokenizer.model" in message
    ), message


def test_router_aux_loss_coef_is_transformers_balancing_loss(tiny_config, tmp_path, transformers):  # noqa: F811
    one_layer = {**ATTENTION, "pattern": "A", "mlp_pattern": "E", "moe": {**MOE, "aux_loss_coef": 0.01}}
    lm, cfg = saved_run(tiny_config, "aux", one_layer)
    export(cfg.run.dir, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["router_aux_loss_coef"] == pytest.approx(0.01 / 2)

    # the same balancing loss: transformers' (with output_router_logits) times its coefficient is unroll's
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_router_logits=True
    ).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).aux_loss * hf.config.router_aux_loss_coef
        lm(tokens)
        ours = lm.aux_loss()
    assert ours > 0 and theirs.item() == pytest.approx(ours.item(), rel=1e-5)

    import_export(tmp_path / "hf", tmp_path / "back")  # unroll's own export: its exact coefficient, unconverted
    assert load_config(str(tmp_path / "back" / "config.yaml")).model.moe.aux_loss_coef == 0.01

    foreign = tmp_path / "foreign"  # a model from elsewhere: config.json is all there is
    foreign.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        shutil.copyfile(tmp_path / "hf" / name, foreign / name)
    (foreign / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": 0.02}))
    assert read_export(foreign).cfg.model.moe.aux_loss_coef == pytest.approx(0.02 * 2 / 1)  # × top_k / MoE layers

    three = {
        **ATTENTION,
        "pattern": "AAA",
        "mlp_pattern": "DEE",  # Qwen2-MoE, 2 MoE layers of 3
        "moe": {**MOE, "top_k": 1, "shared_experts": 1, "shared_hidden": 16, "aux_loss_coef": 0.01},
    }
    _, cfg = saved_run(tiny_config, "qwen", three)
    export(cfg.run.dir, tmp_path / "qwen_hf")
    config = json.loads((tmp_path / "qwen_hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["router_aux_loss_coef"] == pytest.approx(0.01 * 2 / 1)
    (tmp_path / "qwen_hf" / "unroll_config.yaml").unlink()
    assert read_export(tmp_path / "qwen_hf").cfg.model.moe.aux_loss_coef == pytest.approx(0.01)


def test_import_of_a_run_past_its_steps_writes_and_prints_a_command_that_trains(tiny_config, tmp_path, offline_env):
    _, cfg = saved_run(tiny_config, "done", {**ATTENTION, "pattern": "AA"}, step=12)  # train.steps 12: reached
    assert cfg.train.steps == 12
    export(cfg.run.dir, tmp_path / "exp")

    proc = run_cli(
        ["import", tmp_path / "exp", "--out", tmp_path / "again", "train.steps=12"], offline_env, check=False
    )
    message = one_line_error(proc)  # the user's own train.steps is theirs: refused if it trains nothing
    assert "train.steps=12: the import resumes at step 12" in message and not (tmp_path / "again").exists()

    out = run_cli(["import", tmp_path / "exp", "--out", tmp_path / "again"], offline_env).stdout
    assert "continues from step 12 to step 24" in out and "train.steps raised from 12" in out, out
    assert load_config(str(tmp_path / "again" / "config.yaml")).train.steps == 24
    command = re.search(r"`unroll (train [^`]*)`", out).group(1).split()
    run_cli(command, offline_env)  # what the message says to run, as it says it
    assert [r["step"] for r in read_metrics(tmp_path / "again") if "loss" in r] == list(range(13, 25))
    assert (tmp_path / "again" / "checkpoints" / "step_00000024").is_dir()
