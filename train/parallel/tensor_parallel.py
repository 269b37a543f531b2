"""Tensor parallelism (and sequence parallelism) for the single-device LM, applied from outside by a plan per
module type: a table of parameter name → layout over the 1-D `tp` mesh, as torchtitan's plans read.

    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)

How a module runs under its plan (`Sharded`, the one ParallelStyle this file adds): its parameters become
DTensors laid out by the table; its own forward, unchanged, runs on this rank's local shards (plain
tensors), with the sizes it reads (heads, width, ...) set to the local ones meanwhile. Communication
happens only at its edges, as in Megatron's column → row parallel pair:

    input   all-gathered (from the sequence shards under sequence parallelism; with a backward that
            reduce-scatters, or all-reduces, the gradient: every rank used all of it for its part)
    inside  nothing, except M²RNN's norm: one all-reduce of a [B, T, 1] sum of squares
    output  the out/down projection's partial sums, reduce-scattered back to sequence shards (or
            all-reduced without sequence parallelism)

So the recurrences run on local channels (ParaGRU/ParaLSTM) or local heads (M²RNN) with no communication
at all: every ParaRNN cell is elementwise in channels and every M²RNN head is independent. A Newton solve
decides convergence on its own rank's channels (each rank solves its own smaller system to the same
tolerance), so `last_solve` may differ between tp ranks.

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

Fused dimensions. A fused projection's output rows are segments ([q | k | v], [gate | up], ...); a rank must
hold the same heads of every segment, which is not a contiguous block. Where the segments are equal and all
split (gate|up, MoE gate|up, qkv without GQA, M²RNN's conv when q/k are split and G·K = H·V) the parameter
is a DTensor with torch's `_StridedShard(dim, split_factor=segments)`: its local tensor is exactly
[segment 0 part r | segment 1 part r | ...], its full_tensor() is the single-device layout, and each rank
stores 1/tp of it. Where segments differ in size or split (GQA qkv; M²RNN's in_proj, and its conv
otherwise) no DTensor placement describes the rows a rank needs, so the parameter is stored whole
(Replicate) and each rank computes with its rows only; its gradient is all-reduced over tp in the backward
(each rank's gradient holds its rows). For the M²RNN 7B preset that is ~6.9M of ~10.1M mixer weights per
layer kept whole on every tp rank (the MoE experts, most of the model, are split). No weight is permuted:
checkpoints keep the single-device layout, see `checkpoint_view` for DCP.

Embedding, LM head and loss are split over the vocabulary (Megatron's vocabulary parallelism): rank r holds
rows [r·V/tp, (r+1)·V/tp) of the embedding and of the head (tied: the embedding is the head, so both uses
share that split). The embedding looks up the tokens in its rows (zeros for the others) and the partial
sums are reduce-scattered straight to sequence shards under sequence parallelism, all-reduced without. The
final norm's output is whole on every rank (gathered from the sequence shards under sequence parallelism);
each rank computes the logits of its rows only and the loss is vocabulary-parallel (`LM.vocab_group`, the
tp group; kernels/cross_entropy.py: max and sum of exponentials all-reduced, the target logit from the rank
that holds it), chunk by chunk, so no rank holds more than chunk × V/tp logits. Each rank's gradient of the
norm's output is then its rows' part: the backward reduce-scatters it to the sequence shards (all-reduces it
without sequence parallelism). Without targets the LM returns the logits all-gathered over the vocabulary.

Every parameter becomes a DTensor on the tp mesh (AdamW's foreach kernels and clip_grad_norm_ refuse a mix of
DTensors and plain tensors). Generation (`step`) under tensor parallelism is not supported.

With FSDP2 on top (dp × tp), pass `shard_placement_fn=fsdp_shard_placement(dp_size)` to fully_shard: it
shards the strided weights on a dimension other than their fused one (FSDP's default, dim 0, trains
exactly but labels them so that full_tensor() and checkpoints of them are wrong). Checkpoints: DCP in torch
2.13 writes a DTensor as one block and so refuses a strided one; `checkpoint_view(state_dict)` presents it
as its blocks, and the checkpoint is then in the single-device layout (loads into one process, FSDP,
another tp).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from unroll.models.attention import Attention
from unroll.models.lm import LM
from unroll.models.m2rnn import M2RNN
from unroll.models.mlp import SwiGLU
from unroll.models.moe import MoE
from unroll.models.recurrent import RecurrentMixer


class TensorParallelError(ValueError):
    """A model whose shapes the tp size does not divide; the message names the module and the size."""


# --- layouts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fused:
    """A dimension made of concatenated segments (a fused projection). Each segment is (size, parts): it is
    cut into `parts` equal pieces and rank r uses piece r·parts // tp, so parts = tp splits it over the
    ranks and parts = 1 gives every rank all of it. Rank r's local rows are its pieces, in segment order."""

    dim: int
    segments: tuple[tuple[int, int], ...]

    def strided(self, tp: int) -> bool:
        """Whether a DTensor placement describes it: equal segments, each split over the tp ranks."""
        return len({size for size, _ in self.segments}) == 1 and all(parts == tp for _, parts in self.segments)

    def placement(self, tp: int) -> Placement:
        if not self.strided(tp):
            return Replicate()  # stored whole; each rank selects its rows (see select)
        n = len(self.segments)
        return Shard(self.dim) if n == 1 else _StridedShard(self.dim, split_factor=n)

    def check(self, shape: torch.Size, tp: int, name: str) -> None:
        if sum(size for size, _ in self.segments) != shape[self.dim]:
            raise AssertionError(f"{name}: segments {self.segments} do not add up to dim {self.dim} of {tuple(shape)}")
        for size, parts in self.segments:
            if size % parts or (tp % parts and parts % tp):
                raise AssertionError(f"{name}: segment of {size} in {parts} parts on {tp} ranks")

    def select(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        pieces, start = [], 0
        for size, parts in self.segments:
            n = size // parts
            pieces.append(full.narrow(self.dim, start + (rank * parts // tp) * n, n))
            start += size
        return torch.cat(pieces, dim=self.dim)


Layout = Placement | Fused


def _summed(t: torch.Tensor, group) -> torch.Tensor:
    """The sum of `t` over the group, in a fresh contiguous tensor (one copy; gloo needs contiguous data
    and the input may be a view autograd still holds)."""
    t = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(t, group=group)
    return t


class _AllReduceGrad(torch.autograd.Function):
    """Identity; the backward sums the gradient over the group (a weight every rank used for its part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _summed(g, ctx.group), None


class _AllReduce(torch.autograd.Function):
    """Sum over the group; the backward sums the gradient too (each rank's use of the sum is partial)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, g):
        return _summed(g, ctx.group), None


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


_MISSING = object()


@contextlib.contextmanager
def _swapped(module: nn.Module, params: dict[str, torch.Tensor], attrs: dict[str, Any]):
    """Within: the named parameters are the given (local) tensors and the named attributes the given
    values; restored afterwards, whatever happens (FSDP2 may have swapped the parameters themselves in
    before us: we restore exactly what we found)."""
    saved = []
    try:
        for name, value in params.items():
            owner, leaf = _owner(module, name)
            saved.append((owner._parameters, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        for name, value in attrs.items():
            owner, leaf = _owner(module, name)
            saved.append((owner.__dict__, leaf, owner.__dict__.get(leaf, _MISSING)))
            owner.__dict__[leaf] = value
        yield
    finally:
        for store, key, old in reversed(saved):
            if old is _MISSING:
                del store[key]
            else:
                store[key] = old


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, leaf = _owner(module, name)
    return owner._parameters.get(leaf)


def _distribute(module: nn.Module, name: str, layout: Layout, mesh: DeviceMesh) -> None:
    owner, leaf = _owner(module, name)
    param = owner._parameters[leaf]
    tp = mesh.size()
    if isinstance(layout, Fused):
        layout.check(param.shape, tp, f"{type(module).__name__}.{name}")
        placement = layout.placement(tp)
    else:
        placement = layout
    owner._parameters[leaf] = nn.Parameter(
        distribute_tensor(param.data, mesh, [placement]), requires_grad=param.requires_grad
    )


# --- the style ----------------------------------------------------------------------------------------
class Sharded(ParallelStyle):
    """Distributes the module's parameters by `params` (name → layout) and runs its own forward on the
    local shards, with `local` (name → value: sizes, or a replacement forward of a submodule) in place.

    row_parallel=True (a column → row parallel region): the input (a DTensor, or a plain tensor replicated on
    every rank) is redistributed to `compute` and passed on as a local tensor, the module's output (or the
    first of its outputs) holds partial sums and is reduced to `output`, replicated parameters have their
    gradient all-reduced. row_parallel=False: replicated compute, only the parameters' local views swapped in."""

    def __init__(
        self,
        params: dict[str, Layout],
        *,
        local: dict[str, Any] | None = None,
        row_parallel: bool = True,
        compute: Placement = Replicate(),  # noqa: B008 -- placements are immutable values
        output: Placement = Replicate(),  # noqa: B008
    ):
        super().__init__()
        self.params, self.local, self.row_parallel = params, local or {}, row_parallel
        self.compute, self.output = compute, output

    def _local_param(self, p: DTensor, layout: Layout, mesh: DeviceMesh) -> torch.Tensor:
        stored_whole = p.placements[0].is_replicate()
        t = p.to_local()
        if stored_whole and self.row_parallel:  # every rank's gradient is a part of the whole gradient
            t = _AllReduceGrad.apply(t, mesh.get_group())
        if isinstance(layout, Fused) and stored_whole:
            t = layout.select(t, mesh.size(), mesh.get_local_rank())
        return t

    def _enter(self, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        compute = self.compute
        if isinstance(compute, Shard) and compute.dim < 0:
            compute = Shard(compute.dim + x.ndim)
        x = x.redistribute(mesh, [compute])
        # With the whole input, each rank's gradient of it is partial: summed (or reduce-scattered) back.
        # With a shard (Shard(-1): block-diagonal heads) only this rank reads it: its gradient is whole.
        return x.to_local(grad_placements=[Partial()] if compute.is_replicate() else None)

    def _leave(self, y: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        return y.redistribute(mesh, [self.output]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        mesh = device_mesh
        for name, layout in self.params.items():
            _distribute(module, name, layout, mesh)
        inner = module.forward

        def forward(x, *args, **kwargs):
            if self.row_parallel:
                x = self._enter(x, mesh)
            local = {
                name: self._local_param(_param(module, name), layout, mesh) for name, layout in self.params.items()
            }
            with _swapped(module, local, self.local):
                out = inner(x, *args, **kwargs)
            if self.row_parallel:
                out = (self._leave(out[0], mesh), *out[1:]) if isinstance(out, tuple) else self._leave(out, mesh)
            return out

        module.forward = forward
        return module


# --- the plans ----------------------------------------------------------------------------------------
def _need(ok: bool, message: str) -> None:
    if not ok:
        raise TensorParallelError(message)


def recurrent_plan(m: RecurrentMixer, mesh: DeviceMesh, output: Placement) -> Sharded:
    """ParaGRU / ParaLSTM: channels."""
    tp = mesh.size()
    heads, width = m.in_proj.heads, m.width
    _need(width % tp == 0, f"{type(m).__name__}: tp={tp} must divide the recurrent width {width}")
    _need(heads == 1 or heads % tp == 0, f"{type(m).__name__}: tp={tp} must divide rnn_heads={heads} (or rnn_heads=1)")
    params = {
        "in_proj.weight": Shard(2) if heads == 1 else Shard(0),  # [heads, gates, width/heads, d/heads]
        "in_proj.bias": Shard(1),  # [gates, width]
        "a": Shard(1),  # [gates, width]: the recurrence's own coefficients
        "p": Shard(1),  # ParaLSTM's peepholes [2, width]
        "out_proj.weight": Shard(1),  # [d, width]: row-parallel
    }
    params = {name: layout for name, layout in params.items() if _param(m, name) is not None}
    local = {"width": width // tp, "in_proj.width": width // tp, "in_proj.heads": max(heads // tp, 1)}
    return Sharded(params, local=local, compute=Replicate() if heads == 1 else Shard(-1), output=output)


def m2rnn_plan(m: M2RNN, mesh: DeviceMesh, output: Placement) -> Sharded:
    """M²RNN: value heads (with their q/k heads where tp divides them)."""
    tp = mesh.size()
    G, H, K, V = m.qk_heads, m.v_heads, m.k_dim, m.v_dim
    _need(H % tp == 0, f"M2RNN: tp={tp} must divide the value heads {H}")
    _need(G % tp == 0 or tp % G == 0, f"M2RNN: qk_heads={G} and tp={tp}: one must divide the other")
    qk = tp if G % tp == 0 else G  # split over the ranks, or each rank the one q/k head its value heads use
    G_local, H_local = max(G // tp, 1), H // tp
    params = {
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
    mean_square = _AllReduce.apply(x.pow(2).sum(-1, keepdim=True), group) / norm.normalized_shape[-1]
    y = x * torch.rsqrt(mean_square + eps)
    return y * norm.weight if norm.weight is not None else y


def attention_plan(m: Attention, mesh: DeviceMesh, output: Placement) -> Sharded:
    """Attention: heads (query heads with their key/value heads)."""
    tp = mesh.size()
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    _need(H % tp == 0 and KV % tp == 0, f"Attention: tp={tp} must divide n_heads={H} and the kv heads {KV}")
    params = {
        "qkv.weight": Fused(0, ((H * hd, tp), (KV * hd, tp), (KV * hd, tp))),  # [q | k | v] by head
        "out_proj.weight": Shard(1),
    }
    return Sharded(params, local={"n_heads": H // tp, "n_kv_heads": KV // tp}, output=output)


def swiglu_params(m: SwiGLU, tp: int, prefix: str = "") -> dict[str, Layout]:
    """SwiGLU: hidden width."""
    h = m.hidden
    _need(h % tp == 0, f"SwiGLU: tp={tp} must divide the MLP width {h}")
    return {
        f"{prefix}gate_up.weight": Fused(0, ((h, tp), (h, tp))),  # [gate | up]
        f"{prefix}down.weight": Shard(1),  # row-parallel
    }


def moe_plan(m: MoE, mesh: DeviceMesh, output: Placement) -> Sharded:
    """MoE: each expert's hidden width; routing replicated."""
    tp = mesh.size()
    h = m.hidden
    _need(h % tp == 0, f"MoE: tp={tp} must divide the expert width {h}")
    params = {
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


MIXER_PLANS = {RecurrentMixer: recurrent_plan, M2RNN: m2rnn_plan, Attention: attention_plan}


def _mixer_plan(m: nn.Module, mesh: DeviceMesh, output: Placement) -> Sharded:
    for cls, plan in MIXER_PLANS.items():
        if isinstance(m, cls):
            return plan(m, mesh, output)
    raise TensorParallelError(f"no tensor-parallel plan for the mixer {type(m).__name__}")


def _mlp_plan(m: nn.Module, mesh: DeviceMesh, output: Placement) -> Sharded:
    if isinstance(m, MoE):
        return moe_plan(m, mesh, output)
    if isinstance(m, SwiGLU):
        return Sharded(swiglu_params(m, mesh.size()), output=output)
    raise TensorParallelError(f"no tensor-parallel plan for the MLP {type(m).__name__}")


# --- the model ----------------------------------------------------------------------------------------
def apply_tensor_parallel(
    model: LM, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True, stages: list[nn.Module] | None = None
) -> None:
    """Shards `model` in place over the 1-D mesh `tp_mesh` by the plans above. Call it before FSDP (and
    activation checkpointing / compile). Raises TensorParallelError naming what tp does not divide.
    Pipelined (`stages`, this rank's train/parallel/pipeline.py stage modules): only their blocks are sharded, and
    each stage, whose forward replaces the LM's, runs on the local views of its embedding, norm and head."""
    if tp_mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh.ndim} dimensions")
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()  # where the residual stream lives between the blocks
    vocab, tp = model.cfg.vocab_size, tp_mesh.size()
    _need(vocab % tp == 0, f"Embedding and LM head: tp={tp} must divide the vocabulary size {vocab}")
    blocks = model.blocks if stages is None else [b for stage in stages for b in stage.blocks.values()]
    plans = [(block, _mixer_plan(block.mixer, tp_mesh, seq), _mlp_plan(block.mlp, tp_mesh, seq)) for block in blocks]
    for block, mixer_plan, mlp_plan in plans:  # all checked before anything is changed
        parallelize_module(block.mixer, tp_mesh, mixer_plan)
        parallelize_module(block.mlp, tp_mesh, mlp_plan)
        if sp:
            parallelize_module(block, tp_mesh, {"mixer_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
        else:
            parallelize_module(
                block,
                tp_mesh,
                Sharded({"mixer_norm.weight": Replicate(), "mlp_norm.weight": Replicate()}, row_parallel=False),
            )

    for root in [model] if stages is None else stages:
        _shard_root(root, tp_mesh, sp)
    model.step = _no_generation

    for owner in [model] if stages is None else stages:
        plain = [name for name, p in owner.named_parameters() if not isinstance(p, DTensor)]
        if plain:
            raise AssertionError(f"tensor parallelism left parameters without a layout: {plain}")


def _shard_root(root: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> None:
    """The embedding, final norm and head of the LM (or of a pipeline stage, where it holds them, and a
    last stage's replica of a tied embedding): embedding and head split over the vocabulary, the loss
    vocabulary-parallel (`root.vocab_group`); their forward on the local views."""
    params, local = {}, {}  # the [V, d] matrices: vocabulary rows [r·V/tp, (r+1)·V/tp) on rank r
    if getattr(root, "embed", None) is not None:
        params["embed.weight"] = Shard(0)
        local["embed.forward"] = partial(_vocab_parallel_embedding, root.embed, tp_mesh, sp)
    if getattr(root, "head", None) is not None:
        params["head.weight"] = Shard(0)
    if getattr(root, "tied_embed_weight", None) is not None:
        params["tied_embed_weight"] = Shard(0)
    if getattr(root, "norm", None) is not None:
        if sp:
            parallelize_module(root.norm, tp_mesh, SequenceParallel())
            root.norm.register_forward_hook(_gather_sequence)
        else:
            params["norm.weight"] = Replicate()
            root.norm.register_forward_hook(partial(_sum_grad_over_ranks, group=tp_mesh.get_group()))
    root.vocab_group = tp_mesh.get_group()
    parallelize_module(root, tp_mesh, Sharded(params, local=local, row_parallel=False))


def _vocab_parallel_embedding(embed: nn.Embedding, mesh: DeviceMesh, sp: bool, tokens: torch.Tensor):
    """The embedding split over the vocabulary: rank r holds rows [r·V/tp, (r+1)·V/tp) (`embed.weight` is its
    local shard here) and looks up the tokens in that range, zeros for the others; the partial sums are
    reduce-scattered to this rank's sequence shard under sequence parallelism, all-reduced without. In the
    backward each rank receives the whole gradient (all-gathered from the sequence shards) and its rows take
    the positions that read them."""
    T, tp = tokens.shape[1], mesh.size()
    if sp and T % tp:
        raise TensorParallelError(f"sequence parallelism: tp={tp} must divide the sequence length {T}")
    rows = embed.weight.shape[0]
    index = tokens - mesh.get_local_rank() * rows
    mine = (index >= 0) & (index < rows)
    out = F.embedding(torch.where(mine, index, 0), embed.weight) * mine.unsqueeze(-1)
    out = DTensor.from_local(out, mesh, [Partial()], run_check=False)
    return out.redistribute(mesh, [Shard(1) if sp else Replicate()]).to_local()


def _gather_sequence(module, args, out):
    """The final norm's sequence shards → the whole sequence on every rank, for the vocabulary-parallel head and
    loss. Each rank's gradient of it is partial (its vocabulary rows' part, see kernels/cross_entropy.py): the
    backward reduce-scatters it to the sequence shards."""
    return out.redistribute(out.device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def _sum_grad_over_ranks(module, args, out, *, group):
    """Without sequence parallelism: the final norm's (replicated) output, whose gradient each rank computes
    partially (its vocabulary rows' part), gets the sum over the ranks in the backward."""
    return _AllReduceGrad.apply(out, group)


def _no_generation(*args, **kwargs):
    raise NotImplementedError(
        "LM.step (generation) under tensor parallelism is not supported: generate from a checkpoint in one process"
    )


# --- checkpoints and FSDP -----------------------------------------------------------------------------
def checkpoint_view(state_dict: dict) -> dict:
    """`state_dict` (a model's, or get_state_dict's model and optimizer dicts, nested) for
    torch.distributed.checkpoint: every DTensor with a strided shard (a fused dimension, e.g. [gate | up]) is
    presented as the several blocks of the single-device tensor it holds, sharing its storage. DCP (torch
    2.13) writes a DTensor as one block and refuses a strided one ("overlapping chunks"); through this view
    it saves and loads the single-device layout, so a tp checkpoint loads into one process, FSDP or another
    tp and back. Load in place: dcp.load(checkpoint_view(sd)) fills sd's tensors. On a (dp, tp) mesh the
    strided dimension must not also be FSDP's (see fsdp_shard_placement)."""
    if isinstance(state_dict, dict):
        return {k: checkpoint_view(v) for k, v in state_dict.items()}
    if isinstance(state_dict, list):
        return [checkpoint_view(v) for v in state_dict]
    t = state_dict
    if not isinstance(t, DTensor) or not _fused_strided(t.placements):
        return t  # including FSDP2's own (_StridedShard, Shard) on a tp-sharded dimension: DCP knows those
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    runs = [[(0, size)] for size in t.shape]  # per dimension: the (global offset, length) runs held here
    placements = list(t.placements)
    for mesh_dim, p in enumerate(t.placements):
        if not isinstance(p, (Shard, _StridedShard)):
            continue
        n, coord = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
        if runs[p.dim] != [(0, t.shape[p.dim])] or t.shape[p.dim] % n:
            raise NotImplementedError(
                f"checkpoint_view: {t.placements} on shape {tuple(t.shape)}: dimension {p.dim} split twice or unevenly"
            )
        if isinstance(p, _StridedShard):
            seg = t.shape[p.dim] // p.split_factor
            runs[p.dim] = [(s * seg + coord * (seg // n), seg // n) for s in range(p.split_factor)]
            placements[mesh_dim] = Shard(p.dim)
        else:
            runs[p.dim] = [(coord * (t.shape[p.dim] // n), t.shape[p.dim] // n)]
    local, pieces, offsets = t.to_local(), [], []
    for box in itertools.product(
        *[
            [(off, length, sum(n for _, n in dim_runs[:i])) for i, (off, length) in enumerate(dim_runs)]
            for dim_runs in runs
        ]
    ):
        piece = local
        for d, (_, length, start) in enumerate(box):
            piece = piece.narrow(d, start, length)
        pieces.append(piece)
        offsets.append(tuple(off for off, _, _ in box))
    # Built directly: from_local would call view_as, which LocalShardsWrapper supports only up to 2-D.
    spec = DTensorSpec(t.device_mesh, tuple(placements), tensor_meta=TensorMeta(t.shape, t.stride(), t.dtype))
    return DTensor(LocalShardsWrapper(pieces, offsets), spec, requires_grad=False)


def _fused_strided(placements) -> bool:
    """Whether a strided shard is the last placement splitting its dimension (ours, a fused dimension),
    rather than FSDP2's marker for sharding a dimension tp has already sharded."""
    last = {p.dim: p for p in placements if isinstance(p, (Shard, _StridedShard))}
    return any(isinstance(p, _StridedShard) for p in last.values())


def fsdp_shard_placement(dp_size: int):
    """A `shard_placement_fn` for FSDP2's fully_shard (with or without tp): each parameter sharded over
    dp_size ranks on the dimension that gives the largest share the smallest (the earliest such; dim 0,
    FSDP's default, for most weights), never on a dimension tp has strided.

    FSDP's default, dim 0, fails twice: a ParaRNN input projection [heads = 1, gates, width, d] split on
    its dimension of 1 leaves the whole weight on one rank (torch.chunk semantics); and on a weight tp
    already strided on dim 0 the DTensor labels FSDP gives it, (_StridedShard(0, tp), _StridedShard(0,
    segments)), do not describe its data, so full_tensor() and checkpoints of it would be wrong
    (checkpoint_view refuses such a tensor)."""

    def placement(param: nn.Parameter) -> Shard | None:
        strided = {p.dim for p in getattr(param, "placements", ()) if isinstance(p, _StridedShard)}
        dims = [d for d in range(param.ndim) if d not in strided and param.shape[d] > 0]
        if not dims:
            return None
        share = {d: -(-param.shape[d] // dp_size) / param.shape[d] for d in dims}  # the largest rank's part
        return Shard(min(dims, key=lambda d: (share[d], d)))

    return placement
