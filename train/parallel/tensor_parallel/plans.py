"""The tensor-parallel plan of each module type: a table of parameter name → layout over the 1-D `tp` mesh, as
torchtitan's plans read, and the local sizes its forward runs with.

The plans (d = d_model; Shard(k): dimension k in tp equal contiguous parts, rank r holding part r):

  ParaGRU / ParaLSTM (channels; needs tp | width, and tp | heads when heads > 1)
    in_proj.weight   [heads, gates, width/heads, d/heads]  heads = 1: Shard(2) (every gate's channels)
                                                           heads > 1: Shard(0) (whole heads: rank r owns
                                                           channels r·width/tp ..., and reads only its
                                                           heads' d/tp inputs, so its input is Shard(-1))
    in_proj.bias     [gates, width]        Shard(1)
    a, p             [3 | 2, width]        Shard(1)     the recurrence, channel-local
    out_proj.weight  [d, width]            Shard(1)     row-parallel
  M²RNN (value heads; q/k heads too when tp | qk_heads, else each rank computes the one q/k head its
  value heads share, which needs qk_heads | tp; qk_heads = 1 (the 7B preset): q/k replicated)
    in_proj.weight   [q GK | k GK | v HV | a H | g HV, d]   Fused: each segment split by head
    conv.weight      [q GK | k GK | v HV, 1, conv]          Fused: the same channels
    A_log, dt_bias   [H]                   Shard(0)
    D, W             [H, V], [H, V, V]     Shard(0)
    norm.weight      [H·V]                 Shard(0)     RMS over all heads: local sum of squares
                                                        all-reduced (B·T numbers, not B·T·H·V)
    out_proj.weight  [d, H·V]              Shard(1)
  Attention (heads; tp | n_heads and tp | kv_heads)
    qkv.weight       [q H·hd | k KV·hd | v KV·hd, d]       Fused: each segment split by head
    out_proj.weight  [d, H·hd]             Shard(1)
  SwiGLU MLP
    gate_up.weight   [gate h | up h, d]    Fused: each half split (a strided shard)
    down.weight      [d, h]                Shard(1)
  MoE (each expert's hidden width; experts are not split here: that is expert parallelism)
    router.weight    [E, d]                Replicate    routing computed on every rank, identically
    w_gate_up        [E, d, gate h | up h] Fused on dim 2
    w_down           [E, h, d]             Shard(1)
    shared.*         as SwiGLU, inside the same region (one reduction for routed + shared)
  Norms: SequenceParallel (on sequence shards) with sequence_parallel, else replicated.
  Embedding, LM head and loss (vocabulary-parallel; needs tp | vocab_size; see below)
    embed.weight       [V, d]              Shard(0)     rank r looks up the tokens in its rows
    head.weight        [V, d]              Shard(0)     rank r's logits are the columns of its rows
    tied_embed_weight  [V, d]              Shard(0)     a pipeline's last-stage replica of a tied embedding
    norm.weight (final) [d]                SequenceParallel, or replicated
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard

from unroll.models.attention import Attention
from unroll.models.m2rnn import M2RNN
from unroll.models.mlp import SwiGLU
from unroll.models.moe import MoE
from unroll.models.recurrent import RecurrentMixer
from unroll.train.parallel.tensor_parallel.collectives import AllReduce
from unroll.train.parallel.tensor_parallel.layout import Fused, Layout, TensorParallelError, need
from unroll.train.parallel.tensor_parallel.style import Sharded, param_of


def recurrent_plan(m: RecurrentMixer, mesh: DeviceMesh, output: Placement) -> Sharded:
    """ParaGRU / ParaLSTM: channels."""
    tp = mesh.size()
    heads, width = m.in_proj.heads, m.width
    need(width % tp == 0, f"{type(m).__name__}: tp={tp} must divide the recurrent width {width}")
    need(heads == 1 or heads % tp == 0, f"{type(m).__name__}: tp={tp} must divide rnn_heads={heads} (or rnn_heads=1)")
    params: dict[str, Layout] = {
        "in_proj.weight": Shard(2) if heads == 1 else Shard(0),  # [heads, gates, width/heads, d/heads]
        "in_proj.bias": Shard(1),  # [gates, width]
        "a": Shard(1),  # [gates, width]: the recurrence's own coefficients
        "p": Shard(1),  # ParaLSTM's peepholes [2, width]
        "out_proj.weight": Shard(1),  # [d, width]: row-parallel
    }
    params = {name: layout for name, layout in params.items() if param_of(m, name) is not None}
    local = {"width": width // tp, "in_proj.width": width // tp, "in_proj.heads": max(heads // tp, 1)}
    return Sharded(params, local=local, compute=Replicate() if heads == 1 else Shard(-1), output=output)


def m2rnn_plan(m: M2RNN, mesh: DeviceMesh, output: Placement) -> Sharded:
    """M²RNN: value heads (with their q/k heads where tp divides them)."""
    tp = mesh.size()
    G, H, K, V = m.qk_heads, m.v_heads, m.k_dim, m.v_dim
    need(H % tp == 0, f"M2RNN: tp={tp} must divide the value heads {H}")
    need(G % tp == 0 or tp % G == 0, f"M2RNN: qk_heads={G} and tp={tp}: one must divide the other")
    qk = tp if G % tp == 0 else G  # split over the ranks, or each rank the one q/k head its value heads use
    G_local, H_local = max(G // tp, 1), H // tp
    params: dict[str, Layout] = {
        "in_proj.weight": Fused(0, ((G * K, qk), (G * K, qk), (H * V, tp), (H, tp), (H * V, tp))),  # q k v | a | g
        "conv.weight": Fused(0, ((G * K, qk), (G * K, qk), (H * V, tp))),  # depthwise over q k v channels
        "A_log": Shard(0),
        "dt_bias": Shard(0),
        "D": Shard(0),
        "W": Shard(0),  # per value head
        "norm.weight": Shard(0),  # [H·V]
        "out_proj.weight": Shard(1),  # row-parallel
    }
    local = {
        "qk_heads": G_local,
        "v_heads": H_local,
        "conv_channels": 2 * G_local * K + H_local * V,
        "norm.forward": partial(_rms_norm_over_ranks, m.norm, mesh.get_group()),
    }
    return Sharded(params, local=local, output=output)


def _rms_norm_over_ranks(norm: nn.RMSNorm, group, x: torch.Tensor) -> torch.Tensor:
    """nn.RMSNorm over the last dimension split across the tp ranks: the mean square of all of it from
    one all-reduce of the local sums of squares."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    mean_square = AllReduce.apply(x.pow(2).sum(-1, keepdim=True), group) / norm.normalized_shape[-1]
    y = x * torch.rsqrt(mean_square + eps)
    return y * norm.weight if norm.weight is not None else y


def attention_plan(m: Attention, mesh: DeviceMesh, output: Placement) -> Sharded:
    """Attention: heads (query heads with their key/value heads)."""
    tp = mesh.size()
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    need(H % tp == 0 and KV % tp == 0, f"Attention: tp={tp} must divide n_heads={H} and the kv heads {KV}")
    params: dict[str, Layout] = {
        "qkv.weight": Fused(0, ((H * hd, tp), (KV * hd, tp), (KV * hd, tp))),  # [q | k | v] by head
        "out_proj.weight": Shard(1),
    }
    return Sharded(params, local={"n_heads": H // tp, "n_kv_heads": KV // tp}, output=output)


def swiglu_params(m: SwiGLU, tp: int, prefix: str = "") -> dict[str, Layout]:
    """SwiGLU: hidden width."""
    h = m.hidden
    need(h % tp == 0, f"SwiGLU: tp={tp} must divide the MLP width {h}")
    return {
        f"{prefix}gate_up.weight": Fused(0, ((h, tp), (h, tp))),  # [gate | up]
        f"{prefix}down.weight": Shard(1),  # row-parallel
    }


def moe_plan(m: MoE, mesh: DeviceMesh, output: Placement) -> Sharded:
    """MoE: each expert's hidden width; routing replicated."""
    tp = mesh.size()
    h = m.hidden
    need(h % tp == 0, f"MoE: tp={tp} must divide the expert width {h}")
    params: dict[str, Layout] = {
        "router.weight": Replicate(),
        "w_gate_up": Fused(2, ((h, tp), (h, tp))),  # [E, d, gate | up]
        "w_down": Shard(1),  # [E, h, d]
    }
    if m.shared is not None:
        params |= swiglu_params(m.shared, tp, prefix="shared.")
    # The routing, and so the balancing losses, are computed whole on every rank, but inside a region whose
    # gradients are summed over the ranks at its input and its replicated weights: each rank carries 1/tp of
    # the losses' gradient so that the sums count it once (the loss's value is unchanged).
    return Sharded(params, local={"hidden": h // tp, "aux_grad_scale": 1.0 / tp}, output=output)


MIXER_PLANS: dict[type, Callable[[Any, DeviceMesh, Placement], Sharded]] = {
    RecurrentMixer: recurrent_plan,
    M2RNN: m2rnn_plan,
    Attention: attention_plan,
}


def mixer_plan(m: nn.Module, mesh: DeviceMesh, output: Placement) -> Sharded:
    for cls, plan in MIXER_PLANS.items():
        if isinstance(m, cls):
            return plan(m, mesh, output)
    raise TensorParallelError(f"no tensor-parallel plan for the mixer {type(m).__name__}")


def mlp_plan(m: nn.Module, mesh: DeviceMesh, output: Placement) -> Sharded:
    if isinstance(m, MoE):
        return moe_plan(m, mesh, output)
    if isinstance(m, SwiGLU):
        return Sharded(swiglu_params(m, mesh.size()), output=output)
    raise TensorParallelError(f"no tensor-parallel plan for the MLP {type(m).__name__}")
