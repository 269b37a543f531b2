"""The language model: embedding → pre-norm residual blocks from the layer pattern → norm → LM head."""
from __future__ import annotations

import torch
from torch import nn

from unroll.models.attention import Attention
from unroll.models.config import ModelConfig
from unroll.models.mlp import SwiGLU
from unroll.models.paragru import ParaGRU, scaled_out_std
from unroll.models.paralstm import ParaLSTM

RECURRENT = {"G": ParaGRU, "L": ParaLSTM}


def build_mixer(kind: str, cfg: ModelConfig, out_std: float) -> nn.Module:
    if kind in RECURRENT:
        return RECURRENT[kind](cfg.d_model, cfg.rnn_dim, heads=cfg.rnn_heads, solver=cfg.solver,
                               init_std=cfg.init_std, out_std=out_std)
    if kind == "A":
        return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.init_std, out_std)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        out_std = scaled_out_std(cfg.init_std, len(cfg.layers))
        self.kind = kind
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, out_std)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width, cfg.init_std, out_std)

    def forward(self, x: torch.Tensor, state=None):
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x: torch.Tensor, state):
        y, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(kind, cfg) for kind in cfg.layers)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)

    def forward(self, tokens: torch.Tensor, states: list | None = None, return_states: bool = False):
        """tokens [B, T] → logits [B, T, V]; with return_states also each layer's state after T (the KV
        cache or the recurrent state), from which `step` or another `forward` continues."""
        x = self.embed(tokens)
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        logits = self._logits(x)
        return (logits, new_states) if return_states else logits

    def step(self, token: torch.Tensor, states: list | None = None):
        """One token per sequence: token [B] → (logits [B, V], states)."""
        x = self.embed(token)
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state)
            new_states.append(state)
        return self._logits(x), new_states

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
