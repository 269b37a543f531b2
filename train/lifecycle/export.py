"""`unroll export` (a checkpoint → an export directory) and `unroll import` (an export → a run directory
whose checkpoint `unroll train` continues from). The directory layouts: train/lifecycle/export_format.py.

Export reads any checkpoint in one process: DCP reassembles what FSDP, tensor or expert parallelism
sharded (the checkpoints hold the single-device layout), and only the model's keys are read.

Import writes RUN_DIR/config.yaml, the tokenizer's files and checkpoints/step_N with the export's weights bit
for bit, the step and data position the export recorded (0 for a model from elsewhere), and a fresh
AdamW state (zero moments, step count 0: the first step after it is the first step of a new optimizer;
the optimizer's own state is not exported). The config's non-model sections come from --config, else
from the export's unroll_config.yaml, else the defaults; key=value overrides go on top (e.g. data.train). A
train.steps that the export's step has already reached is raised by that step (`_train_past`), so that the
written config trains. A model with fewer vocabulary rows than its tokenizer has ids is refused (read_export).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from unroll.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_in
from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.checkpoint.resolve import STATE_FILE
from unroll.train.checkpoint.rundir import CONFIG_FILE
from unroll.train.config import Config, ConfigError, load_config, to_yaml
from unroll.train.lifecycle.export_format import CONFIG, META, WEIGHTS, ExportError, build_model, read_export
from unroll.train.lifecycle.grow import fresh_adamw_state
from unroll.train.lifecycle.hf_layout import LayoutError, hf_architecture, hf_config, to_hf, tokenizer_config
from unroll.train.optim import build_optimizer

FORMATS = ("auto", "hf", "unroll")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_checkpoint(path: str | Path) -> tuple[Config, dict, dict, Path]:
    """(config, model state dict on the CPU, train state, run directory) of a checkpoint, in one process."""
    run_dir = resolve.run_directory(path)
    cfg = load_config(str(run_dir / CONFIG_FILE))
    ckpt = resolve.checkpoint_of(path, cfg.model).path  # a run directory: its newest good checkpoint
    with torch.device("meta"):  # no initialisation: every tensor is then read from the checkpoint
        model = LM(cfg.model)
    model.to_empty(device="cpu")
    checkpoint.load_model_weights(ckpt, model)
    train_state = json.loads((ckpt / STATE_FILE).read_text())
    return cfg, {k: v.detach() for k, v in model.state_dict().items()}, train_state, run_dir


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: already exists and is not empty; choose a new directory")


def _fresh_dir(out: Path) -> Path:
    """A temporary sibling of `out` to write into and rename at the end; `out` must not hold anything."""
    _check_out(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty, checked in _fresh_dir
    tmp.rename(out)
    return out


def export(path: str | Path, out: str | Path, *, fmt: str = "auto", dtype: str = "float32") -> dict:
    """Writes the export directory; returns its unroll_export.json content (with "out")."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(out)
    _check_out(out)
    cfg, state, train_state, run_dir = read_checkpoint(path)
    tokenizer = _run_tokenizer(run_dir)
    layout = "unroll"
    if fmt != "unroll":
        try:
            layout = hf_architecture(cfg.model, state)
        except LayoutError as e:
            if fmt == "hf":
                raise ExportError(
                    f"--format hf: the model of {run_dir} (pattern {cfg.model.pattern!r}, "
                    f"mlp_pattern {cfg.model.mlp_pattern!r}) fits no transformers layout: {e}; "
                    f"--format unroll writes unroll's own layout"
                ) from None
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    tmp = _fresh_dir(out)
    if layout == "unroll":
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
    else:
        save_file(to_hf(layout, cfg.model, state), tmp / WEIGHTS, metadata={"format": "pt"})
        config = hf_config(
            layout,
            cfg.model,
            max_positions=cfg.data.seq_len,
            dtype=dtype,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_to(tmp)  # an HF tokenizer: tokenizer.json and the tokenizer_config.json transformers reads
    if layout != "unroll" and tokenizer.kind == "sentencepiece":
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (tmp / CONFIG).write_text(to_yaml(cfg))
    meta = {
        "layout": layout,
        "step": train_state["step"],
        "dtype": dtype,
        "source": str(Path(path).resolve()),
        "train_state": {k: v for k, v in train_state.items() if k != "step"},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    _finish(tmp, out)
    return meta | {"out": str(out)}


def import_export(
    src: str | Path,
    out: str | Path,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    step: int | None = None,
) -> dict:
    """Writes the run directory `out`; returns {"out", "step", "checkpoint"}."""
    out = Path(out).resolve()
    _check_out(out)
    export = read_export(src)
    if export.tokenizer is None:
        raise ExportError(
            f"{src}: no tokenizer.model or tokenizer.json; a run needs the tokenizer its data was tokenized with"
        )
    tokenizer = load_tokenizer(export.tokenizer)
    base = load_config(config) if config else export.cfg
    base = dataclasses.replace(base, model=export.cfg.model)
    base.run.dir, base.data.tokenizer = str(out), str(out / export.tokenizer.name)  # the copy save_to writes
    cfg = _with_overrides(base, overrides)
    model = build_model(export, src, cfg.model)  # overrides may change e.g. model.solver, not the shapes
    optimizer = build_optimizer(model, cfg)
    fresh_adamw_state(optimizer)
    train_state = {"samples_consumed": 0, "tokens_consumed": 0, "world_size": 1, "initial_val_loss": None}
    train_state |= export.meta.get("train_state", {})
    step = export.meta.get("step", 0) if step is None else step
    steps_raised_from = _train_past(cfg, step, overrides)
    tmp = _fresh_dir(out)
    tokenizer.save_to(tmp)
    (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
    saved = checkpoint.save(tmp, step, model, optimizer, train_state, keep=1)
    _finish(tmp, out)
    return {
        "out": str(out),
        "step": step,
        "checkpoint": str(out / saved.relative_to(tmp)),
        "steps": cfg.train.steps,
        "steps_raised_from": steps_raised_from,
    }


def _run_tokenizer(run_dir: Path) -> Tokenizer:
    found = tokenizer_in(run_dir)
    if found is None:
        raise ExportError(f"{run_dir}: no tokenizer.model or tokenizer.json (the copy of the run's tokenizer)")
    return load_tokenizer(found)


def _train_past(cfg: Config, step: int, overrides: Sequence[str]) -> int | None:
    """A run that resumes at `step` trains while step < train.steps. A train.steps the export's (or --config's)
    run had already reached becomes step + train.steps, so that `unroll train` trains (it returns the old
    value); one given as an override is the user's choice, refused if it trains nothing."""
    if step < cfg.train.steps:
        return None
    if any(o.split("=", 1)[0].strip() == "train.steps" for o in overrides):
        raise ConfigError(
            f"train.steps={cfg.train.steps}: the import resumes at step {step}, so `unroll train` "
            f"would train no step; set train.steps above {step}"
        )
    old, cfg.train.steps = cfg.train.steps, step + cfg.train.steps
    return old


def _with_overrides(base: Config, overrides: Sequence[str]) -> Config:
    """`base` with key=value overrides applied and validated (through the YAML the run directory keeps)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(to_yaml(base))
        f.flush()
        return load_config(f.name, list(overrides))
