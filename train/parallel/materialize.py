"""Allocating and initialising a model built on the meta device, after its layout has been applied: each
rank allocates only the shards it holds and computes only their elements (models/init.py makes every
element a function of the seed, the parameter's name and the element's global index).

What a rank holds of a parameter, per dimension, as the global indices of its local tensor:
  a DTensor      its placements applied in mesh-dimension order to that dimension's indices, as DTensor
                 splits data: Shard(d) keeps chunk r of torch.chunk's n chunks (the last ones may be short
                 or empty, as FSDP2's uneven shards); _StridedShard(d, s) cuts the indices into s equal
                 segments and keeps chunk r of each (tensor parallelism's fused [gate | up] weights, and
                 FSDP2 sharding a dimension tensor parallelism has already split); Replicate and Partial
                 keep everything.
  an expert-parallel expert tensor (train/parallel/expert_parallel.py) its `global_rows` attribute: (experts in
                 the whole tensor, first expert held); dimension 0 holds that contiguous block.
  anything else  the whole tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from unroll.models.init import init_parameters
from unroll.train.parallel.expert_parallel import tag_expert_parameters


def _take(indices: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    chunks = indices.chunk(parts)
    return chunks[rank] if rank < len(chunks) else indices[:0]


def dtensor_index(t: DTensor) -> list[torch.Tensor]:
    """The global indices, per dimension, of the elements of t's local tensor on this rank."""
    index = [torch.arange(n) for n in t.shape]
    mesh = t.device_mesh
    # from the mesh's rank grid rather than mesh.get_coordinate(): DTensor may hand back an equal mesh
    # cached by an earlier process group of this process (a rehearsal of several ranks in turn)
    coordinate = [int(c) for c in (mesh.mesh == torch.distributed.get_rank()).nonzero()[0]]
    for mesh_dim, placement in enumerate(t.placements):
        n, r = mesh.size(mesh_dim), coordinate[mesh_dim]
        if isinstance(placement, _StridedShard):
            d, s = placement.dim, placement.split_factor
            segments = index[d].chunk(int(s))
            index[d] = torch.cat([_take(seg, n, r) for seg in segments])
        elif isinstance(placement, Shard):
            index[placement.dim] = _take(index[placement.dim], n, r)
    local = tuple(t.to_local().shape)
    if tuple(len(i) for i in index) != local:
        raise AssertionError(
            f"placements {t.placements} of {tuple(t.shape)}: the computed local shape "
            f"{tuple(len(i) for i in index)} is not the local tensor's {local}"
        )
    return index


def shard_index(t: torch.Tensor) -> tuple[tuple[int, ...], list[torch.Tensor], torch.Tensor]:
    """(global shape, per-dimension global indices, the local tensor to write) of a parameter or buffer."""
    if isinstance(t, DTensor):
        return tuple(t.shape), dtensor_index(t), t.to_local()
    rows = getattr(t, "global_rows", None)
    if rows is not None:
        total, first = rows
        index = [torch.arange(first, first + t.shape[0])] + [torch.arange(n) for n in t.shape[1:]]
        return (total,) + tuple(t.shape[1:]), index, t
    return tuple(t.shape), [torch.arange(n) for n in t.shape], t


def materialize(module: nn.Module, device: torch.device, seed: int) -> None:
    """Allocates `module`'s meta tensors on `device` (FSDP2 keeps its sharding through to_empty) and
    initialises what this rank holds, under the names `module` gives them (an LM's, or a pipeline stage's,
    which are the LM's)."""
    module.to_empty(device=device)  # new parameter objects (meta → device): attributes are set anew
    tag_expert_parameters(module)
    init_parameters(module, seed, index_of=shard_index)
