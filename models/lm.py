"""The language model: embedding → pre-norm residual blocks from the layer pattern → norm → LM head."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unroll.kernels.cross_entropy import chunked_cross_entropy, gather_vocab
from unroll.models.attention import Attention
from unroll.models.config import ModelConfig
from unroll.models.init import Rule, fresh_seed, init_parameters, normal
from unroll.models.m2rnn import M2RNN
from unroll.models.mlp import SwiGLU
from unroll.models.moe import MoE, balancing_loss
from unroll.models.paragru import ParaGRU, scaled_out_std
from unroll.models.paralstm import ParaLSTM
from unroll.models.recurrent import RecurrentMixer
from unroll.models.tnt import TNT

RECURRENT = {"G": ParaGRU, "L": ParaLSTM}

Mixer = RecurrentMixer | M2RNN | TNT | Attention
# What a mixer carries from one call to the next: its own type per mixer (a recurrent state tensor,
# KVCache, M2RNNState, TNTState), None before the first token.
MixerState = Any


def build_mixer(kind: str, cfg: ModelConfig, out_std: float) -> Mixer:
    if kind in RECURRENT:
        return RECURRENT[kind](
            cfg.d_model,
            cfg.rnn_dim,
            heads=cfg.rnn_heads,
            solver=cfg.solver,
            newton_kernel=cfg.newton_kernel,
            newton_damping=cfg.newton_damping,
            init_std=cfg.init_std,
            rnn_init=cfg.rnn_init,
            out_std=out_std,
        )
    if kind == "M":
        m = cfg.m2rnn
        return M2RNN(
            cfg.d_model,
            k_dim=m.k_dim,
            v_dim=m.v_dim,
            qk_heads=m.qk_heads,
            v_heads=cfg.m2rnn_v_heads,
            conv=m.conv,
            solver=m.solver,
            conv_init=m.conv_init,
            state_grad_clip=m.state_grad_clip,
            newton_damping=cfg.newton_damping,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    if kind == "T":
        t = cfg.tnt
        return TNT(
            cfg.d_model,
            heads=t.heads,
            head_dim=t.head_dim,
            layers=t.layers,
            expansion=t.expansion,
            global_chunk=t.global_chunk,
            local_chunks=tuple(t.local_chunks),
            local_reset=t.local_reset,
            qk_project=t.qk_project,
            momentum=t.momentum,
            forget=t.forget,
            max_step=t.max_step,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    if kind == "A":
        return Attention(
            cfg.d_model,
            cfg.n_heads,
            cfg.kv_heads,
            cfg.rope_theta,
            cfg.init_std,
            out_std,
            head_dim=cfg.attn_head_dim,
            rope=cfg.rope,
            window=cfg.window,
            document_positions=cfg.rope_document_positions,
            kernel=cfg.attention_kernel,
        )
    raise ValueError(f"unknown layer kind {kind!r}")


def build_mlp(kind: str, cfg: ModelConfig, out_std: float) -> MoE | SwiGLU:
    if kind == "E":
        m = cfg.moe
        return MoE(
            cfg.d_model,
            m.experts,
            m.top_k,
            m.hidden,
            shared_experts=m.shared_experts,
            shared_hidden=m.shared_hidden or m.hidden,
            score=m.score,
            aux_loss_coef=m.aux_loss_coef,
            z_loss_coef=m.z_loss_coef,
            bias_update_rate=m.bias_update_rate,
            init_std=cfg.init_std,
            out_std=out_std,
        )
    return SwiGLU(cfg.d_model, cfg.mlp_width, cfg.init_std, out_std)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, kind: str, cfg: ModelConfig, mlp_kind: str = "D"):
        super().__init__()
        out_std = scaled_out_std(cfg.init_std, len(cfg.layers))
        self.kind, self.mlp_kind = kind, mlp_kind
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, out_std)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = build_mlp(mlp_kind, cfg, out_std)
        # Activation checkpointing, set from outside (train/parallel/parallelize.py): "full" keeps only the block's
        # input and recomputes the block in the backward; "mlp" recomputes only the MLP half (whose
        # hidden activations are usually the widest) and keeps the mixer's.
        self.recompute = "none"

    def forward(
        self, x: torch.Tensor, state: MixerState = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        """resets: bool [B, T], True where a document begins at t (nothing before t is seen there); None: one
        stream per row."""
        if self.recompute == "full" and torch.is_grad_enabled():
            out: tuple[torch.Tensor, MixerState] = checkpoint(self._forward, x, state, resets, use_reentrant=False)
            return out
        return self._forward(x, state, resets)

    def _forward(
        self, x: torch.Tensor, state: MixerState = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        y, state = self.mixer(self.mixer_norm(x), state, resets=resets)
        x = x + y
        if self.recompute == "mlp" and torch.is_grad_enabled():
            return x + checkpoint(self._mlp, x, use_reentrant=False), state
        return x + self._mlp(x), state

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.mlp(self.mlp_norm(x))
        return y

    def step(self, x: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        y, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class LM(nn.Module):
    """Built on the meta device; then, unless the caller itself builds on meta (`with torch.device("meta")`,
    to shard before allocating: train/parallel/materialize.py), allocated on the default device and initialised
    from `seed` (None: drawn from torch's global generator). The weights are a function of the seed and
    the parameter names only (models/init.py), whatever later holds which part of them."""

    # Set from outside, like the mixers' context group (models/context_parallel.py): tokens per logits chunk
    # of the loss (train.loss_chunk; 0 = all at once), and the process group the vocabulary is split over
    # (train/parallel/tensor_parallel/vocab.py; None = the embedding and head hold the whole vocabulary).
    loss_chunk: int = 1024
    vocab_group: dist.ProcessGroup | None = None

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(kind, cfg, mlp) for kind, mlp in zip(cfg.layers, cfg.mlp_kinds))
            self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if device.type != "meta":
            self.to_empty(device=device)
            init_parameters(self, fresh_seed() if seed is None else seed)

    def init_rules(self) -> dict[str, Rule]:
        return {"embed.weight": normal(self.cfg.init_std), "head.weight": normal(self.cfg.init_std)}

    def output_weight(self) -> torch.Tensor:
        """The [V, d] matrix that maps the final hidden states to logits: the head's, or the tied embedding."""
        return self.embed.weight if self.head is None else self.head.weight

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(x), self.output_weight())
        return logits if self.vocab_group is None else gather_vocab(logits, self.vocab_group)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from the last block's output x [B, T, d] and targets [B, T], chunk by
        chunk (kernels/cross_entropy.py): the [B, T, V] logits are never held whole."""
        return chunked_cross_entropy(
            self.norm(x).flatten(0, 1),
            self.output_weight(),
            targets.flatten(),
            chunk=self.loss_chunk,
            group=self.vocab_group,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        states: list[MixerState] | None = None,
        return_states: bool = False,
        targets: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[MixerState]]:
        """tokens [B, T] → logits [B, T, V]; with targets [B, T] the mean cross-entropy loss (a scalar) instead,
        computed without the full logits; with return_states also each layer's state after T (the KV cache
        or the recurrent state), from which `step` or another `forward` continues. resets [B, T] (bool): True
        where a new document begins at t, which then sees nothing before t (no state, memory or attention
        crosses it; a reset at t = 0 drops that row's incoming state); None: each row one stream."""
        x = self.embed(tokens)
        states = states or [None] * len(self.blocks)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, states[i], resets)
            # kept only when asked, and let go before the next block: a recurrent state is a view of the
            # layer's whole solution [B, T, ...], a KV cache of its q/k/v projection
            new_states.append(state if return_states else None)
            del state
        out = self._logits(x) if targets is None else self.loss(x, targets)
        return (out, new_states) if return_states else out

    def step(
        self, token: torch.Tensor, states: list[MixerState] | None = None
    ) -> tuple[torch.Tensor, list[MixerState]]:
        """One token per sequence: token [B] → (logits [B, V], states)."""
        x = self.embed(token)
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = cast(Block, block).step(x, state)
            new_states.append(state)
        return self._logits(x), new_states

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token goes through: all but the routed experts it is not sent to."""
        return self.num_params() - sum(m.inactive_params() for m in self.modules() if isinstance(m, MoE))

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.mlp) for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE layers' load-balancing and z-losses of the last forward, to add to the loss (None without
        MoE layers); each layer's part of its gradient is applied when the backward reaches that layer."""
        return balancing_loss([moe for _, moe in self.moe_layers()])
