"""Loading a trained model for generation: from its run directory alone (config.yaml, its tokenizer's copy,
checkpoints/), or from an export directory (train/lifecycle/export_format.py), which needs neither
torch.distributed.checkpoint nor the training stack."""

from __future__ import annotations

from pathlib import Path

import torch

from unroll.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_in
from unroll.models import LM
from unroll.models.generate import sample
from unroll.train.checkpoint.rundir import CONFIG_FILE
from unroll.train.lifecycle.export_format import check_vocab_fits, is_export, load_export, pickled_weights


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[LM, Tokenizer, int]:
    """(model with the newest checkpoint's weights, tokenizer, step)."""
    from unroll.train.checkpoint import dcp as checkpoint  # DCP: only for run directories
    from unroll.train.checkpoint import resolve
    from unroll.train.checkpoint.integrity import CheckpointError
    from unroll.train.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE}) nor an export directory")
    cfg = load_config(str(run_dir / CONFIG_FILE))
    tokenizer = tokenizer_in(run_dir)
    if tokenizer is None:
        raise CheckpointError(f"{run_dir}: no tokenizer.model or tokenizer.json (the run's tokenizer) in it")
    check_vocab_fits(cfg.model.vocab_size, tokenizer, run_dir / CONFIG_FILE, "model.vocab_size", ConfigError)
    found = resolve.newest_good(run_dir, cfg.model)
    model = LM(cfg.model)
    checkpoint.load_model_weights(found.path, model)
    return model.to(device).eval(), load_tokenizer(tokenizer), found.step


def load_model(path: str | Path, device: str = "cpu") -> tuple[LM, Tokenizer, int]:
    """A run directory or an export directory → (model, tokenizer, step); a directory of pickled weights
    is taken as an export, which load_export refuses naming the file."""
    export = is_export(path) or (not (Path(path) / CONFIG_FILE).is_file() and pickled_weights(path))
    return load_export(path, device) if export else load_run(path, device)


def generate_text(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    model, tokenizer, _ = load_model(run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    ids = sample(
        model,
        tokenizer.encode(prompt),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=torch.Generator().manual_seed(seed),
    )
    return prompt + tokenizer.decode(ids)
