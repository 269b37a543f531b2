"""Export directories: what `unroll export` writes and what `unroll import` / `unroll generate` read.

Every export directory holds
  model.safetensors    the weights (float32 unless exported with --dtype)
  tokenizer.model      the run's tokenizer: the sentencepiece model (ids: unk 0, bos 1, eos 2), or
  or tokenizer.json    an HF tokenizer's tokenizer.json beside a tokenizer_config.json naming its EOS/BOS
                       (data/tokenizer.py)
  unroll_config.yaml   the run's resolved config (its `model` section builds the LM; its data paths are
                       the run's, which `unroll import EXPORT --out DIR data.train=[...]` can replace)
  unroll_export.json   {"layout", "step", "train_state", "dtype", "source"}: which layout, and where
                       training stood (`unroll import` resumes from there)
and, by layout:
  unroll               model.safetensors under unroll's own state-dict names (embed.weight,
                       blocks.{i}.mixer.*, blocks.{i}.mlp.*, norm.weight, head.weight when untied; the MoE
                       buffer expert_bias included). Any model, recurrent and hybrid ones included; read by
                       unroll only.
  llama, mistral,      transformers' layout (train/lifecycle/hf_layout.py): config.json + model.safetensors under
  mixtral, qwen2_moe   transformers' names, and tokenizer_config.json; `AutoModelForCausalLM` and
                       `AutoTokenizer.from_pretrained(DIR)` load them.
A transformers directory without the unroll files (a model from elsewhere) imports too, when its
architecture is one of the four and its math is unroll's (see train/lifecycle/hf_layout.py).

Reading needs neither torch.distributed.checkpoint nor the optimizer or trainer: `load_export` builds the
LM from the files alone (what `unroll generate EXPORT_DIR` calls). It reads only safetensors, JSON and
YAML, none of which can run code: a directory whose weights are pickled (transformers' pytorch_model.bin,
a torch.save .pt/.pth/.ckpt) is refused, naming the file, and a shard index may name only .safetensors
files beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from unroll.data.tokenizer import load_tokenizer, tokenizer_in
from unroll.models import LM
from unroll.train.config import Config, ConfigError, load_config, validate
from unroll.train.lifecycle.hf_layout import LayoutError, from_hf, hf_aux_loss_coef, model_fields

WEIGHTS, CONFIG, META, HF_CONFIG = (
    "model.safetensors",
    "unroll_config.yaml",
    "unroll_export.json",
    "config.json",
)
SHARD_INDEX = "model.safetensors.index.json"  # transformers' save_pretrained splits large models
# weights saved with pickle (torch.save, transformers' older default): loading them can run code
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


class ExportError(ValueError):
    """An export directory that cannot be read or written; the message names it."""


@dataclasses.dataclass
class Export:
    cfg: Config  # model from the export; the other sections from unroll_config.yaml (defaults without it)
    state: dict  # unroll state-dict names → tensors
    layout: str
    meta: dict  # unroll_export.json ({} for a directory from elsewhere)
    tokenizer: Path | None


def is_export(path: str | Path) -> bool:
    path = Path(path)
    weights = (path / WEIGHTS).is_file() or (path / SHARD_INDEX).is_file()
    return weights and ((path / META).is_file() or (path / HF_CONFIG).is_file())


def pickled_weights(path: str | Path) -> Path | None:
    """A pickle-format weights file in the directory `path`, if it holds one and no safetensors weights."""
    path = Path(path)
    if (path / WEIGHTS).is_file() or (path / SHARD_INDEX).is_file() or not path.is_dir():
        return None
    return next((f for pattern in PICKLED_WEIGHTS for f in sorted(path.glob(pattern)) if f.is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: {e}") from None


def read_export(path: str | Path) -> Export:
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such export directory")
    pickled = pickled_weights(path)
    if pickled is not None:
        raise ExportError(
            f"{pickled}: pickled weights, not read (unpickling can run code); unroll reads only "
            f"{WEIGHTS} (or {SHARD_INDEX} and its shards): save them as safetensors, e.g. "
            f"transformers' save_pretrained(DIR, safe_serialization=True)"
        )
    if not is_export(path):
        raise ExportError(f"{path}: not an export (needs {WEIGHTS} or {SHARD_INDEX}, and {META} or {HF_CONFIG})")
    meta = _read_json(path / META) if (path / META).is_file() else {}
    cfg = load_config(str(path / CONFIG)) if (path / CONFIG).is_file() else Config()
    tensors = _load_weights(path)
    layout = meta.get("layout") or _read_json(path / HF_CONFIG).get("model_type", "?")
    try:
        if layout == "unroll":
            state = tensors
        else:
            hf = _read_json(path / HF_CONFIG)
            arch, fields, moe = model_fields(hf)
            if (path / CONFIG).is_file() and hf.get("router_aux_loss_coef") == hf_aux_loss_coef(cfg.model):
                moe.pop("aux_loss_coef", None)  # unroll's export, unedited: its exact value, not one converted back
            moe_cfg = dataclasses.replace(cfg.model.moe, **moe)
            cfg.model = dataclasses.replace(cfg.model, **fields, moe=moe_cfg)
            validate(cfg)
            state = from_hf(arch, cfg.model, tensors)
    except (LayoutError, ConfigError) as e:
        raise ExportError(f"{path}: {e}") from None
    tokenizer = tokenizer_in(path)
    if tokenizer is not None:
        unroll = layout == "unroll"
        check_vocab_fits(
            cfg.model.vocab_size,
            tokenizer,
            path / (CONFIG if unroll else HF_CONFIG),
            "model.vocab_size" if unroll else "vocab_size",
        )
    return Export(cfg, state, layout, meta, tokenizer)


def check_vocab_fits(vocab_size: int, tokenizer: Path, model_file: Path, key: str, error=ExportError) -> None:
    """A model with fewer embedding rows than its tokenizer has ids cannot take the ids past its vocabulary
    (IndexError in the first forward that meets one): refused, naming both numbers and both files. More rows
    than ids is a padded vocabulary, which is fine."""
    n = load_tokenizer(tokenizer).vocab_size
    if vocab_size < n:
        raise error(
            f"{model_file}: {key} {vocab_size} is smaller than the {n} tokens of the tokenizer {tokenizer} "
            f"(ids {vocab_size}-{n - 1} have no embedding row): the model and tokenizer do not belong "
            f"together; use the tokenizer the model was trained with"
        )


def _load_weights(path: Path) -> dict:
    """model.safetensors, or every shard that model.safetensors.index.json names."""
    files = [path / WEIGHTS]
    if not files[0].is_file():
        names = sorted(set(_read_json(path / SHARD_INDEX).get("weight_map", {}).values()))
        odd = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors")]
        if odd:
            raise ExportError(
                f"{path / SHARD_INDEX}: names {odd[0]!r}; its shards must be .safetensors files beside it"
            )
        files = [path / f for f in names]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors |= load_file(file)
        except Exception as e:  # safetensors' errors for a missing, truncated or foreign file
            raise ExportError(f"{file}: cannot be read ({e})") from None
    return tensors


def build_model(export: Export, source: str | Path, model_cfg=None) -> LM:
    """The LM of the export's config (or `model_cfg`) with its weights (cast to float32), every tensor
    checked."""
    model = LM(model_cfg or export.cfg.model)
    params = model.state_dict()
    state = {k: v.to(params[k].dtype) if k in params else v for k, v in export.state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch lists every mismatch, one per line: the first says enough
        problems = [line.strip() for line in str(e).splitlines()[1:]] or [str(e)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"{source}: weights do not fit the model of its config: {problems[0]}{more}") from None
    return model


def load_export(path: str | Path, device: str = "cpu"):
    """(LM in eval mode, Tokenizer, step) from an export directory alone."""
    export = read_export(path)
    if export.tokenizer is None:
        raise ExportError(f"{path}: no tokenizer.model or tokenizer.json (the tokenizer to encode prompts with)")
    model = build_model(export, path)
    return model.to(device).eval(), load_tokenizer(export.tokenizer), export.meta.get("step", 0)
