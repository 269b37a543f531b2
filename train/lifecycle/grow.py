"""G_stack depth growth (Du et al., 2024, "Stacking Your Transformers"): a trained L-layer model becomes a
g·L-layer one whose block i is the source's block i mod L (the whole stack repeated g times), ready for
`unroll train` to continue.

`grow(SOURCE, g, OUT)` writes OUT as a run directory:
  OUT/config.yaml      the source run's config with model.pattern (and a per-layer model.mlp_pattern)
                       repeated g times — "GA" → "GAGA" for g=2; a pattern with stage marks keeps them and
                       gets one between copies ("GG|AA" → "GG|AA|GG|AA", g times the pipeline stages) — and
                       run.dir = OUT; `key=value` overrides apply on top (e.g. train.steps for the grown run,
                       or model.pattern=GGAA|GGAA to place the stage marks otherwise; overrides that change
                       the architecture are refused)
  OUT/tokenizer.model  the source run's tokenizer (so `unroll generate OUT` works at once; an HF tokenizer's
                       files are tokenizer.json and tokenizer_config.json)
  OUT/checkpoints/step_00000000/   a complete checkpoint (manifest included) of the grown model
Every block's weights (mixer of every kind, norms, dense or MoE MLP with its expert bias) are copied bit for
bit from block i mod L; the embedding, final norm and LM head are copied. The optimizer is fresh: AdamW's
state at step 0 (zero moments), as a new run starts with.

Schedule and data, decided here: the grown run is a new run of `train.steps` steps, so its step counter
starts at 0 and the learning-rate schedule starts over, warmup included (the stacked model's layers see a
new function; the paper likewise trains the grown model with its own schedule). The data position does not
start over: `samples_consumed` continues from the source checkpoint, so the grown model sees the samples
after the ones the small model trained on, and the `tokens` the run logs count the small model's tokens
too (the paper's accounting of G_stack's cost). `unroll train OUT/config.yaml` continues; on any number of
ranks and any layout, since DCP reshards on load. Like a new run, it validates before its first step (the
step-0 row of metrics.jsonl: the grown model's loss as stacked), and its first line names the checkpoint it
was grown from. The source may be a checkpoint of a multi-rank (FSDP, TP, EP) run: DCP reads it in one
process without a process group.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from unroll.data.tokenizer import load_tokenizer, tokenizer_in
from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, resolve
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.checkpoint.rundir import CONFIG_FILE
from unroll.train.config import Config, ConfigError, load_config, to_yaml
from unroll.train.data_order import STATE_KEY as DATA_ORDER_KEY
from unroll.train.optim import build_optimizer

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def grow_pattern(pattern: str, factor: int) -> str:
    """The layer string repeated `factor` times; stage marks, where the source has any, between copies too."""
    return "|".join([pattern] * factor) if "|" in pattern else pattern * factor


def grown_model_config(model_cfg, factor: int):
    mlp = model_cfg.mlp_pattern
    if len(mlp.replace("|", "")) > 1:  # one character per layer: repeat it with the layers
        mlp = grow_pattern(mlp, factor)
    return replace(model_cfg, pattern=grow_pattern(model_cfg.pattern, factor), mlp_pattern=mlp)


def stacked_state_dict(source: dict[str, torch.Tensor], n_layers: int, grown_keys) -> dict[str, torch.Tensor]:
    """The grown model's state dict: block i from source block i mod n_layers, every other key as is."""
    out = {}
    for key in grown_keys:
        m = BLOCK_KEY.match(key)
        src = f"blocks.{int(m.group(1)) % n_layers}.{m.group(2)}" if m else key
        out[key] = source[src].detach().clone()
    return out


def grow(source: str | Path, factor: int, out: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Writes the grown run directory OUT (see the module docstring); returns what was done."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ConfigError(f"--factor must be an integer >= 2 (the depth multiple), got {factor!r}")
    run_dir = resolve.run_directory(source)
    cfg = load_config(str(run_dir / CONFIG_FILE))
    ckpt = resolve.checkpoint_of(source, cfg.model).path  # a run directory: its newest good checkpoint
    out = Path(out)
    if resolve.checkpoint_dirs(out) or (out / CONFIG_FILE).exists():
        raise CheckpointError(f"{out}: already holds a run (config.yaml or checkpoints); grow into a new directory")
    grown_cfg = _grown_config(cfg, factor, out, overrides)

    with open(ckpt / resolve.STATE_FILE) as f:
        source_state = json.load(f)
    small = LM(cfg.model)
    checkpoint.load_model_weights(ckpt, small)  # one process: DCP reshards a multi-rank save

    torch.manual_seed(grown_cfg.train.seed)
    model = LM(grown_cfg.model)
    n_layers = len(cfg.model.layers)
    model.load_state_dict(stacked_state_dict(small.state_dict(), n_layers, model.state_dict().keys()))
    optimizer = build_optimizer(model, grown_cfg)
    fresh_adamw_state(optimizer)
    samples = source_state.get("samples_consumed", 0)
    state = {
        "samples_consumed": samples,
        "tokens_consumed": samples * grown_cfg.data.seq_len,
        "world_size": 1,
        "initial_val_loss": None,
        "grown_from": {
            "checkpoint": str(ckpt.absolute()),
            "step": source_state.get("step"),
            "factor": factor,
            "layers": [n_layers, n_layers * factor],
        },
    }
    if DATA_ORDER_KEY in source_state:  # the data position goes on in the source's order (train/data_order.py)
        state[DATA_ORDER_KEY] = source_state[DATA_ORDER_KEY]
    final = checkpoint.save(out, 0, model, optimizer, state, keep=grown_cfg.checkpoint.keep)
    tokenizer = tokenizer_in(run_dir)
    if tokenizer is not None:
        load_tokenizer(tokenizer).save_to(out)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(to_yaml(grown_cfg))
    tmp.replace(out / CONFIG_FILE)  # last: a directory with config.yaml is a finished grow
    return {
        "source": str(ckpt),
        "source_step": source_state.get("step"),
        "out": str(out),
        "checkpoint": str(final),
        "pattern": [cfg.model.pattern, grown_cfg.model.pattern],
        "params": [small.num_params(), model.num_params()],
        "samples_consumed": samples,
    }


def _grown_config(cfg: Config, factor: int, out: Path, overrides: Sequence[str]) -> Config:
    """The source config with the model grown and run.dir = OUT, then the overrides, validated."""
    grown = replace(cfg, model=grown_model_config(cfg.model, factor), run=replace(cfg.run, dir=str(out)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        path.write_text(to_yaml(grown))
        final = load_config(str(path), [*overrides, f"run.dir={out}"])
    if integrity.architecture(final.model) != integrity.architecture(grown.model):
        raise ConfigError(
            f"overrides {list(overrides)} change the grown model's architecture; grow first, "
            f"then start a new run if a different model is meant"
        )
    return final


def fresh_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's own lazy initialisation, done now so the checkpoint holds it: one step on zero gradients at
    lr 0 (the weights do not move: decay by 1 - 0·wd, update 0·0/eps), then the step counters set back to
    0 — the state a new optimizer reaches before its first step (zero moments, step 0)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for st in optimizer.state.values():
        st["step"].zero_()


# --- when to grow: the paper's fitted growth timing -------------------------------------------------------

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, what: str) -> float:
    """'7e9', '7B', '2T', '1.5M', '7000000000' → a float; anything else names the option at fault."""
    s = str(text).strip().upper()
    scale = _SUFFIX.get(s[-1:], None)
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: cannot read {text!r} as a positive count (e.g. 7e9, 7B, 2T)")
    return value


def growth_tokens(params: float, tokens: float) -> float:
    """d, the tokens to train the small model before stacking (Du et al., 2024, eq. 3):

        log10(d) = 0.88·log10(N) + 163.27 / log10(C) − 5.74,   C = 6·N·D FLOPs,

    with N in parameters, D and d in tokens, as written. It reproduces the paper's figures: d = 6.58B
    tokens for N = 8B, D = 15T; 11.11B for 7B / 2T; 15.84B for 13B / 2T; 42.48B for 70B / 2T
    (tests/test_grow.py checks them)."""
    compute = 6.0 * params * tokens
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(compute) - 5.74)


RECOMMENDED_FACTOR = 4  # the paper's finding: g = 4 works across sizes


def format_count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def plan_text(params: float, tokens: float) -> str:
    d = growth_tokens(params, tokens)
    return "\n".join(
        [
            "G_stack growth timing (Du et al., 2024): log10(d) = 0.88·log10(N) + 163.27/log10(C) − 5.74, C = 6·N·D",
            f"N = {format_count(params)} parameters, D = {format_count(tokens)} tokens, C = {6 * params * tokens:.3e} FLOPs",
            f"grow after d = {format_count(d)} tokens ({d:.4g}; {100 * d / tokens:.2f}% of D)",
            f"growth factor g = {RECOMMENDED_FACTOR} (recommended): train the 1/{RECOMMENDED_FACTOR}-depth model (about "
            f"{format_count(params / RECOMMENDED_FACTOR)} parameters) for d tokens, then "
            f"`unroll grow RUN_DIR --factor {RECOMMENDED_FACTOR} --out DIR` and train on",
        ]
    )
