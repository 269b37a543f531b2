"""What a model config amounts to: parameters (total and active per token), per layer, and the state each
layer carries per sequence when generating. Built on the meta device, so a 7B config costs no memory."""

from __future__ import annotations

from typing import Any, cast

import torch

from unroll.models.attention import Attention
from unroll.models.config import MIXER_CHARS, MLP_CHARS, ModelConfig
from unroll.models.lm import LM, Block
from unroll.models.m2rnn import M2RNN
from unroll.models.moe import MoE
from unroll.models.recurrent import RecurrentMixer
from unroll.models.tnt import TNT


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _state(mixer: torch.nn.Module) -> dict[str, Any]:
    """Per sequence: fixed-size recurrent state elements, or the KV cache's growth per token."""
    if isinstance(mixer, RecurrentMixer):
        return {"state_elements": mixer.width * mixer.state_size}
    if isinstance(mixer, M2RNN):
        return {
            "state_elements": mixer.state_elements(),
            "conv_state_elements": mixer.conv_channels * (mixer.conv_width - 1),
        }
    if isinstance(mixer, TNT):
        return {"state_elements": mixer.state_elements()}
    if isinstance(mixer, Attention):
        per_token = 2 * mixer.n_kv_heads * mixer.head_dim
        return {"state_elements": None, "kv_elements_per_token": per_token, "kv_window": mixer.window or None}
    raise TypeError(f"no state description for {type(mixer).__name__}")


def summarize(cfg: ModelConfig) -> dict[str, Any]:
    with torch.device("meta"):
        model = LM(cfg)
    layers: list[dict[str, Any]] = []
    for i, module in enumerate(model.blocks):
        block = cast(Block, module)
        params = _count(block)
        inactive = block.mlp.inactive_params() if isinstance(block.mlp, MoE) else 0
        layers.append(
            {
                "layer": i,
                "mixer": MIXER_CHARS[block.kind],
                "mlp": MLP_CHARS[block.mlp_kind],
                "params": params,
                "params_active": params - inactive,
                "mixer_params": _count(block.mixer),
                "mlp_params": _count(block.mlp),
            }
            | _state(block.mixer)
        )
    embed = _count(model.embed)
    head = _count(model.head) if model.head is not None else 0
    fixed_state = sum(layer["state_elements"] or 0 for layer in layers)
    kv = sum(layer.get("kv_elements_per_token", 0) for layer in layers)
    return {
        "pattern": cfg.pattern,
        "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "params_total": model.num_params(),
        "params_active": model.active_params(),
        "params_embedding": embed,
        "params_head": head,
        "state_elements": fixed_state,
        "kv_elements_per_token": kv,
        "layers": layers,
    }


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def format_summary(name: str, s: dict[str, Any]) -> str:
    lines = [
        f"{name}: pattern {s['pattern']!r}, d_model {s['d_model']}, vocab {s['vocab_size']:,}",
        f"  parameters: {s['params_total']:,} total ({s['params_total'] / 1e9:.3f}B), "
        f"{s['params_active']:,} active per token ({s['params_active'] / 1e9:.3f}B)",
        f"  embedding {s['params_embedding']:,}"
        + (f", untied LM head {s['params_head']:,}" if s["params_head"] else ", tied LM head"),
        f"  state per sequence: {s['state_elements']:,} recurrent elements"
        + (f" + {s['kv_elements_per_token']:,} KV-cache elements per token" if s["kv_elements_per_token"] else ""),
        "",
        f"  {'layer':>5} {'mixer':9} {'mlp':5} {'params':>14} {'active':>14} {'mixer':>12} {'state':>10}",
    ]
    for layer in s["layers"]:
        state = (
            _fmt(layer["state_elements"])
            if layer["state_elements"] is not None
            else (f"{layer['kv_elements_per_token']:,}/tok")
        )
        lines.append(
            f"  {layer['layer']:5d} {layer['mixer']:9} {layer['mlp']:5} {layer['params']:14,} "
            f"{layer['params_active']:14,} {layer['mixer_params']:12,} {state:>10}"
        )
    return "\n".join(lines)
