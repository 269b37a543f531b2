"""Applying a parallel layout to the single-device model from outside (torchtitan's order: TP → activation
checkpointing → compile → FSDP; the first three arrive with the rest of the distributed work).

Data parallelism: with dp_shard > 1, FSDP2 `fully_shard` on every block and then on the root (the
embedding, final norm and head), over the dp_shard mesh dimension, or over (dp_replicate, dp_shard) for
HSDP (sharded within a group, replicated across groups). With dp_shard = 1 and dp_replicate > 1, DDP.
`step` (token-by-token generation) is registered as a forward method, so generating also gathers the
sharded parameters.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from unroll.models import LM
from unroll.train.mesh import Layout, LayoutError

NOT_YET = ("cp", "tp", "pp", "ep")


def parallelize(model: LM, mesh: DeviceMesh | None, layout: Layout, *, bf16: bool) -> torch.nn.Module:
    """Shards or wraps `model` in place; returns the module the training step calls (the model itself
    under FSDP2, its DDP wrapper under plain replication). bf16: FSDP2 computes in bfloat16 parameters and
    reduces gradients in float32 (its MixedPrecisionPolicy; used on GPU)."""
    missing = [f"parallel.{d}={getattr(layout, d)}" for d in NOT_YET if getattr(layout, d) > 1]
    if missing:
        raise LayoutError(f"{', '.join(missing)}: not available yet; data parallelism (parallel.dp_replicate, "
                          f"parallel.dp_shard) is")
    if mesh is None:
        return model
    if layout.dp_shard > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp)
            register_fsdp_forward_method(block, "step")
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)
        register_fsdp_forward_method(model, "step")
        return model
    return DistributedDataParallel(model)


def gradient_sync(trained: torch.nn.Module, sync: bool):
    """A context for one micro-batch: with sync=False gradients accumulate locally (no all-reduce or
    reduce-scatter), as for every micro-batch but the last."""
    import contextlib

    if isinstance(trained, DistributedDataParallel):
        return contextlib.nullcontext() if sync else trained.no_sync()
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
