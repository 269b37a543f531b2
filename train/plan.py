"""`unroll plan`: per-GPU memory of a config under a parallel layout, on paper, and the layouts that fit.

The model (all sizes in bytes, per GPU; P = parameters this GPU holds a share of):

  parameter share   P_gpu = (dense params / (pp · tp) + expert params / (pp · ep · tp)) / (dp_shard · cp)
                    (pp splits the layers, tp the matrices, ep the experts, and FSDP shards what is left
                    over dp_shard × cp, the ranks that hold the same weights)
  weights           4 · P_gpu     fp32 master copy (FSDP2 keeps the sharded parameters in fp32)
  gradients         4 · P_gpu     fp32, reduce-scattered
  optimizer         8 · P_gpu     AdamW's two fp32 moments
  gathered          2 · 2 · (largest block / (tp · ep))   bf16 all-gathered weights of the block being
                                  computed and the next one (prefetch)
  activations       tokens_gpu · layers_per_stage · a_layer · in_flight, tokens_gpu = micro_batch · seq_len / cp
                    a_layer: with per-block activation checkpointing, the block input kept (2·d bytes per
                    token) plus one block recomputed at a time (its full activations, below);
                    without, every block's full activations: ~34·d/tp bytes per token for a pre-norm block
                    (Korthikanti et al., 2022, flash attention: no s² term) plus the mixer's own:
                    Newton 10·D·4 (states, Jacobians and residuals in fp32), M²RNN sequential
                    4·H·K·V / 32 (one state checkpoint per 32 steps), MoE 2·top_k·(2·hidden + d).
                    in_flight: micro-batches whose activations a pipeline stage holds (pp for 1F1B).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from unroll.models.config import ModelConfig
from unroll.models.summary import summarize
from unroll.train.mesh import Layout, not_yet

GiB = 1024 ** 3


@dataclass
class Estimate:
    layout: dict
    params_gpu: float
    weights: float
    grads: float
    optimizer: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations


def _mixer_bytes_per_token(layer: dict, cfg: ModelConfig, tp: int) -> float:
    if layer["mixer"] in ("paragru", "paralstm"):
        return 10 * layer["state_elements"] * 4 / tp
    if layer["mixer"] == "m2rnn":
        return 4 * layer["state_elements"] / 32 / tp
    return 0.0


def estimate(cfg: ModelConfig, layout: dict, *, seq_len: int, micro_batch: int, checkpointing: bool,
             summary: dict | None = None) -> Estimate:
    """summary: summarize(cfg), when the caller already has it (it builds the model on the meta device)."""
    s = summary or summarize(cfg)
    pp, tp, ep, cp, shard = layout["pp"], layout["tp"], layout["ep"], layout["cp"], layout["dp_shard"]
    expert_total = sum(_expert_params(layer, cfg) for layer in s["layers"])
    dense = s["params_total"] - expert_total
    params_gpu = (dense / (pp * tp) + expert_total / (pp * ep * tp)) / (shard * cp)
    largest = max((layer["params"] - _expert_params(layer, cfg)) / tp + _expert_params(layer, cfg) / (tp * ep)
                  for layer in s["layers"])
    tokens = micro_batch * seq_len / cp
    per_stage = -(-len(s["layers"]) // pp)
    d = cfg.d_model
    full = [34 * d / tp + _mixer_bytes_per_token(layer, cfg, tp)
            + (2 * cfg.moe.top_k * (2 * cfg.moe.hidden + d) if layer["mlp"] == "moe" else 0)
            for layer in s["layers"]]
    per_layer = (2 * d + max(full) / per_stage) if checkpointing else sum(full) / len(full)
    activations = tokens * per_stage * per_layer * (pp if pp > 1 else 1)
    return Estimate(layout, params_gpu, 4 * params_gpu, 4 * params_gpu, 8 * params_gpu, 2 * 2 * largest, activations)


def _expert_params(layer: dict, cfg: ModelConfig) -> float:
    if layer["mlp"] != "moe":
        return 0.0
    return cfg.moe.experts * 3 * cfg.d_model * cfg.moe.hidden


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: ModelConfig, world: int, gpus_per_node: int):
    """Every (pp, tp, cp, ep, dp_shard) on `world` GPUs the model's shapes allow and the trainer runs
    (train/mesh.py's not_yet), tp within a node."""
    kinds = set(cfg.layers)
    for tp, pp, cp in itertools.product(_divisors(gpus_per_node), _divisors(world), (1, 2, 4, 8)):
        if world % (tp * pp * cp) or pp > len(cfg.layers):
            continue
        if tp > 1 and ("A" in kinds and (cfg.n_heads % tp or cfg.kv_heads % tp)
                       or "M" in kinds and cfg.m2rnn_v_heads % tp or kinds & {"G", "L"} and cfg.rnn_dim % tp
                       or cfg.vocab_size % tp  # the embedding and head are split over the vocabulary
                       or "T" in kinds):  # TNT has no tensor-parallel plan yet
            continue
        shard = world // (tp * pp * cp)
        eps = [e for e in _divisors(shard * cp) if e <= cfg.moe.experts and cfg.moe.experts % e == 0] \
            if "E" in cfg.mlp_kinds else [1]
        for ep in eps:
            layout = {"pp": pp, "dp_replicate": 1, "dp_shard": shard, "cp": cp, "tp": tp, "ep": ep}
            if not not_yet(Layout(**layout)):  # only what the trainer can run
                yield layout


def _cost(layout: dict) -> tuple:
    """Preference among fitting layouts: less model parallelism first (each costs communication or
    bubbles), tp before pp before cp; more expert parallelism is cheap (it shrinks expert memory)."""
    return (layout["tp"] * layout["pp"] * layout["cp"], layout["pp"], layout["cp"], layout["tp"], -layout["ep"])


def plan(cfg: ModelConfig, *, nodes: int, gpus_per_node: int, seq_len: int, micro_batch: int,
         gpu_gib: float = 80.0, checkpointing: bool = True, usable: float = 0.9) -> list[Estimate]:
    """The layouts that fit `usable` of each GPU's memory, best first."""
    fits, summary = [], summarize(cfg)
    for layout in candidate_layouts(cfg, nodes * gpus_per_node, gpus_per_node):
        e = estimate(cfg, layout, seq_len=seq_len, micro_batch=micro_batch, checkpointing=checkpointing,
                     summary=summary)
        if e.total <= usable * gpu_gib * GiB:
            fits.append(e)
    return sorted(fits, key=lambda e: _cost(e.layout))


def format_estimate(e: Estimate) -> str:
    lay = " ".join(f"{k}={v}" for k, v in e.layout.items())
    parts = ", ".join(f"{name} {getattr(e, name) / GiB:.1f}" for name in
                      ("weights", "grads", "optimizer", "gathered", "activations"))
    return f"{lay}: {e.total / GiB:.1f} GiB per GPU ({parts}; {e.params_gpu / 1e6:,.0f}M parameters held)"
