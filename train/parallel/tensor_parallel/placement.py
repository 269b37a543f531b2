"""FSDP2 on top of tensor parallelism (dp × tp): pass `shard_placement_fn=fsdp_shard_placement(dp_size)` to
fully_shard. It shards the strided weights on a dimension other than their fused one (FSDP's default, dim 0,
trains exactly but labels them so that full_tensor() and checkpoints of them are wrong)."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard

from unroll.train.parallel.dtensor_internals import _StridedShard


def fsdp_shard_placement(dp_size: int):
    """A `shard_placement_fn` for FSDP2's fully_shard (with or without tp): each parameter sharded over
    dp_size ranks on the dimension that gives the largest share the smallest (the earliest such; dim 0,
    FSDP's default, for most weights), never on a dimension tp has strided.

    FSDP's default, dim 0, fails twice: a ParaRNN input projection [heads = 1, gates, width, d] split on
    its dimension of 1 leaves the whole weight on one rank (torch.chunk semantics); and on a weight tp
    already strided on dim 0 the DTensor labels FSDP gives it, (_StridedShard(0, tp), _StridedShard(0,
    segments)), do not describe its data, so full_tensor() and checkpoints of it would be wrong
    (train/checkpoint/views.py refuses such a tensor)."""

    def placement(param: nn.Parameter) -> Shard | None:
        strided = {p.dim for p in getattr(param, "placements", ()) if isinstance(p, _StridedShard)}
        dims = [d for d in range(param.ndim) if d not in strided and param.shape[d] > 0]
        if not dims:
            return None
        share = {d: -(-param.shape[d] // dp_size) / param.shape[d] for d in dims}  # the largest rank's part
        return Shard(min(dims, key=lambda d: (share[d], d)))

    return placement
