"""What DCP sees of a state dict: every parallel layout presented in the single-device one, so that a
checkpoint saved under one layout loads under any other (one process, FSDP, tp, ep, and back).

  tp_view    tensor parallelism's fused weights (a strided shard: [gate | up], [q | k | v]) as the blocks of
             the single-device tensor each rank holds
  ep_view    expert parallelism's experts (plain tensors, different on every ep rank, under the same names)
             as one tensor sharded over the ep ranks
  dcp_view   both, for a model's (and optimizer's) state: what dcp.py saves and loads

Each view shares storage with the state it presents, so a DCP load into it lands in place. The private torch
internals tp_view needs, and why: train/parallel/dtensor_internals.py.
"""

from __future__ import annotations

import itertools

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from unroll.train.parallel.dtensor_internals import DTensorSpec, LocalShardsWrapper, TensorMeta, _StridedShard


def dcp_view(model: torch.nn.Module, state: dict) -> dict:
    """{"model": ..., "optim": ...} (get_state_dict's dicts) as DCP saves and loads them: ep_view, then tp_view."""
    return tp_view(ep_view(model, state))


def ep_view(model: torch.nn.Module, state: dict) -> dict:
    """Expert-parallel experts (plain tensors, different on every ep rank, under the same names) presented
    to DCP as one tensor sharded over the ep ranks (dim 0: rank r holds experts r·E/ep ...), model and
    optimizer state alike, sharing storage so that a load lands in place. The experts are the parameters
    expert parallelism tagged with their `ep_mesh` (train/parallel/expert_parallel.py)."""
    meshes = {name: p.ep_mesh for name, p in model.named_parameters() if hasattr(p, "ep_mesh")}
    if not meshes:
        return state

    def wrap(t, mesh):  # the last mesh dimension splits the experts; any before it replicates them
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return DTensor.from_local(t, mesh, [Replicate()] * (mesh.ndim - 1) + [Shard(0)], run_check=False)
        return t

    out = {"model": dict(state["model"]), "optim": dict(state["optim"])}
    out["optim"]["state"] = dict(state["optim"]["state"])
    for name, mesh in meshes.items():
        out["model"][name] = wrap(state["model"][name], mesh)
        if name in out["optim"]["state"]:
            out["optim"]["state"][name] = {k: wrap(v, mesh) for k, v in state["optim"]["state"][name].items()}
    return out


def tp_view(state_dict: dict) -> dict:
    """`state_dict` (a model's, or get_state_dict's model and optimizer dicts, nested) for
    torch.distributed.checkpoint: every DTensor with a strided shard (a fused dimension, e.g. [gate | up]) is
    presented as the several blocks of the single-device tensor it holds, sharing its storage. DCP (torch
    2.13) writes a DTensor as one block and refuses a strided one ("overlapping chunks"); through this view
    it saves and loads the single-device layout, so a tp checkpoint loads into one process, FSDP or another
    tp and back. Load in place: dcp.load(tp_view(sd)) fills sd's tensors. On a (dp, tp) mesh the
    strided dimension must not also be FSDP's (see tensor_parallel/placement.py)."""
    if isinstance(state_dict, dict):
        return {k: tp_view(v) for k, v in state_dict.items()}
    if isinstance(state_dict, list):
        return [tp_view(v) for v in state_dict]
    t = state_dict
    if not isinstance(t, DTensor) or not _fused_strided(t.placements):
        return t  # including FSDP2's own (_StridedShard, Shard) on a tp-sharded dimension: DCP knows those
    runs = [[(0, size)] for size in t.shape]  # per dimension: the (global offset, length) runs held here
    placements = list(t.placements)
    for mesh_dim, p in enumerate(t.placements):
        if not isinstance(p, (Shard, _StridedShard)):
            continue
        n, coord = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
        if runs[p.dim] != [(0, t.shape[p.dim])] or t.shape[p.dim] % n:
            raise NotImplementedError(
                f"tp_view: {t.placements} on shape {tuple(t.shape)}: dimension {p.dim} split twice or unevenly"
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
