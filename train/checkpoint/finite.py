"""No checkpoint holds a NaN or an inf: the check each rank runs on the tensors it is about to save.

What is checked is what DCP would write: this rank's part of the model and optimizer state (a DTensor's
local shard; floating-point tensors only). The common case costs one sum per tensor, a read of every
byte at memory speed with no temporary the size of the tensor: a sum is finite whenever every element
is, unless finite elements overflow it (values near the dtype's limit), so a tensor whose sum is not
finite is then checked exactly (torch.isfinite) before it is called bad. The ranks agree with one
all-reduce of a flag; only when some rank found a bad tensor are the names gathered, so that every rank
reports the same first one (in rank order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

from unroll.train.parallel import distributed as D


def named_tensors(state, prefix: str = ""):
    """(dotted name, local tensor) of every floating-point tensor in nested dicts and lists, in order."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from named_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from named_tensors(value, f"{prefix}{i}.")
    elif isinstance(state, torch.Tensor):
        # _local_tensor, not to_local(): to_local takes a view, which LocalShardsWrapper refuses above 2-D
        local = state._local_tensor if isinstance(state, DTensor) else state
        # tensor parallelism's fused weights in single-device layout (views.tp_view) hold several local
        # shards, on which no reduction is defined: each is checked on its own
        for shard in local.local_shards() if isinstance(local, LocalShardsWrapper) else [local]:
            if shard.is_floating_point() or shard.is_complex():
                yield prefix[:-1], shard


def first_non_finite(state) -> str | None:
    """The name of the first tensor in `state` that holds a NaN or an inf; None when every one is finite."""
    named = [(name, t) for name, t in named_tensors(state) if t.numel() and t.device.type != "meta"]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    suspects = []
    for indices in by_device.values():  # one synchronisation per device
        sums = torch.stack([_sum(named[i][1]) for i in indices])
        suspects += [indices[j] for j in torch.nonzero(~torch.isfinite(sums)).flatten().tolist()]
    for i in sorted(suspects):
        if not bool(torch.isfinite(named[i][1]).all()):
            return named[i][0]
    return None


def _sum(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def agreed_non_finite(state) -> str | None:
    """Collective: the first non-finite tensor on any rank ("NAME on rank R" under several ranks), the
    same on every rank; None when every rank's tensors are finite."""
    bad = first_non_finite(state)
    # the flag goes where the tensors are: NCCL reduces only GPU tensors
    device = next((t.device for _, t in named_tensors(state) if t.device.type != "meta"), torch.device("cpu"))
    if not D.any_rank(bad is not None, device):
        return None
    if bad is not None and dist.is_initialized() and dist.get_world_size() > 1:
        bad = f"{bad} on rank {dist.get_rank()}"
    return D.first_reported(bad)
