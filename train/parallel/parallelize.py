"""Applying a parallel layout to the single-device model from outside, in torchtitan's order: TP →
activation checkpointing → compile → FSDP. Pipeline parallelism (train/parallel/pipeline.py) cuts the model into
stages before this; each stage is then sharded as an FSDP root of its own.

Expert parallelism (ep > 1, ep dividing dp_shard, without cp, tp or pp for now): each rank keeps E/ep
experts of every MoE and tokens travel to them by all_to_all within groups of ep consecutive data ranks
(train/parallel/expert_parallel.py); the groups replicate each other's experts, and FSDP2 ignores those expert
parameters. Their gradients are sums over the group's tokens: the trainer sums them over the replicas and
divides by dp, FSDP's average (`average_expert_grads`).

Tensor parallelism (tp > 1): the declared per-module plans of train/parallel/tensor_parallel/, with sequence
parallel norms; then FSDP2 over the data-parallel ranks of each tp group.

Context parallelism (cp > 1): every mixer gets the cp process group and works on its slice of the
sequence (recurrences by sequence-parallel Newton or a state hand-off, attention over gathered keys and
values); the trainer gives each cp rank its slice of the tokens.

Data parallelism: with dp_shard > 1, FSDP2 `fully_shard` on every block and then on the root (the
embedding, final norm and head), over the dp_shard mesh dimension (dp_shard × cp under context
parallelism), or over (dp_replicate, that) for HSDP (sharded within a group, replicated across groups).
With dp_shard = 1, DDP over dp_replicate × cp.
`step` (token-by-token generation) is registered as a forward method, so generating also gathers the
sharded parameters.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, cast

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from unroll.models import LM
from unroll.models.context_parallel import ContextParallel
from unroll.models.lm import Block
from unroll.train.parallel.expert_parallel import (
    apply_expert_parallel_to_model,
    expert_parameters,
    tag_expert_parameters,
)
from unroll.train.parallel.materialize import materialize
from unroll.train.parallel.mesh import Layout, check_supported
from unroll.train.parallel.tensor_parallel import apply_tensor_parallel
from unroll.train.parallel.tensor_parallel.placement import fsdp_shard_placement

if TYPE_CHECKING:
    from unroll.train.parallel.pipeline_stages import StageModule


def apply_activation_checkpointing(model: LM, mode: str) -> None:
    """Recompute each block ("full") or each MLP ("mlp") in the backward instead of keeping its activations."""
    if mode == "none":
        return
    for block in model.blocks:
        cast(Block, block).recompute = mode


def apply_compile(model: LM) -> None:
    """torch.compile every block in place (parameter names unchanged, so checkpoints are unaffected). The fused
    Newton solve (ParaGRU on CUDA, kernels/fused_newton.py) is one op in the graph; newton.py's PyTorch loop
    breaks the graph at each iteration's convergence test, and the projections, norms and MLPs around it compile."""
    for block in model.blocks:
        block.compile()


def parallelize(
    model: LM,
    mesh: DeviceMesh | None,
    layout: Layout,
    *,
    device: torch.device,
    seed: int,
    bf16: bool,
    activation_checkpoint: str = "none",
    compile: bool = False,
    stages: list[StageModule] | None = None,
) -> torch.nn.Module:
    """Shards or wraps `model` (built on the meta device) in place, in torchtitan's order (TP → activation
    checkpointing → compile → context groups → FSDP), then allocates and initialises on `device` only what
    this rank holds (train/parallel/materialize.py: the same weights from `seed` whatever the layout), then DDP.
    Returns the module the training step calls (the model itself under FSDP2, its DDP wrapper under plain
    replication). Pipelined (`stages`): only this rank's stage modules are materialised; the rest of the
    model stays on the meta device. bf16: FSDP2 computes in bfloat16 parameters and reduces gradients in
    float32 (its MixedPrecisionPolicy; used on GPU)."""
    check_supported(layout)
    if mesh is None:
        apply_activation_checkpointing(model, activation_checkpoint)
        if compile:
            apply_compile(model)
        materialize(model, device, seed)
        return model
    _shard(model, mesh, layout, bf16=bf16, activation_checkpoint=activation_checkpoint, compile=compile, stages=stages)
    parts: list[torch.nn.Module] = list(stages) if stages else [model]
    for part in parts:
        materialize(part, device, seed)
    if layout.dp * layout.cp == 1 or uses_fsdp(layout, bool(stages)):
        return model
    return DistributedDataParallel(model, process_group=mesh["dp_cp"].get_group())


def uses_fsdp(layout: Layout, pipelined: bool) -> bool:
    """FSDP2 over the data ranks, rather than DDP: with dp_shard > 1, and for pipelined stages (always FSDP
    roots: plain replication is HSDP with a shard dimension of 1, and torch's pipeline schedules drive
    FSDP's gradient reduction themselves) and tp (DDP cannot hold DTensors) whenever there are data ranks."""
    return layout.dp_shard > 1 or ((pipelined or layout.tp > 1) and layout.dp * layout.cp > 1)


def _shard(
    model: LM,
    mesh: DeviceMesh,
    layout: Layout,
    *,
    bf16: bool,
    activation_checkpoint: str,
    compile: bool,
    stages: list[StageModule] | None,
) -> None:
    """Everything parallelize does before allocating: tp, recomputation, compile, ep, cp, FSDP2."""
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True, stages=stages)
    apply_activation_checkpointing(model, activation_checkpoint)
    if compile:
        apply_compile(model)
    experts = set()
    if layout.ep > 1:
        # the data ranks as (expert replicas, ep): ep consecutive dp_shard ranks split the experts, and
        # each such group's experts are replicated over the others (dp / ep groups)
        ep_mesh = mesh["dp"]._unflatten(0, (layout.dp // layout.ep, layout.ep), ("edp", "ep"))
        apply_expert_parallel_to_model(model, ep_mesh["ep"].get_group())
        tag_expert_parameters(model, ep_mesh)  # checkpoints see them as one tensor sharded over the ep ranks
        experts = {p for _, p in expert_parameters(model)}
    if layout.cp > 1:
        apply_context_parallel(model, mesh["cp"].get_group())
    # cp ranks hold the same weights and compute partial gradients of the same samples: gradients are
    # averaged over dp × cp, which is the mean loss's gradient since every rank's loss is its slice's mean.
    shard_dim = "dp_shard_cp" if layout.cp > 1 else "dp_shard"
    if uses_fsdp(layout, bool(stages)):
        # FSDP2 warns when a wrapped block returns a view: a recurrent block returns its state beside its
        # output, a view of the solution at the last position. The warning guards against in-place ops on
        # such a view; the LM never changes a state in place (training drops it, generation only reads it).
        warnings.filterwarnings(
            "ignore",
            message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor",
            category=UserWarning,
            module=r"torch\.distributed\.fsdp\.",
        )
        dp_mesh = mesh["dp_replicate", shard_dim] if layout.dp_replicate > 1 else mesh[shard_dim]
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        # each weight on the dimension that spreads it best (not always dim 0), and under tp never on one
        # tp strided
        placement = fsdp_shard_placement(layout.dp_shard * layout.cp)
        # expert-parallel experts are already distinct per rank: FSDP leaves them alone
        ignored = experts or None
        if stages:  # pipelined: each of this rank's stages is an FSDP root over its own blocks
            for stage in stages:
                for block in stage.blocks.values():
                    fully_shard(block, mesh=dp_mesh, mp_policy=mp, shard_placement_fn=placement)
                fully_shard(stage, mesh=dp_mesh, mp_policy=mp, shard_placement_fn=placement)
            return
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, shard_placement_fn=placement, ignored_params=ignored)
            register_fsdp_forward_method(block, "step")
        fully_shard(model, mesh=dp_mesh, mp_policy=mp, shard_placement_fn=placement, ignored_params=ignored)
        register_fsdp_forward_method(model, "step")


def apply_context_parallel(model: LM, group) -> None:
    """Every block's sequence-aware parts (models/context_parallel.py: the mixer, a MoE for its balancing
    statistics) work on this rank's slice of the sequence, through their one hook, `set_context_group`.
    A mixer without the hook cannot run on a slice: refused."""
    for block in model.blocks:
        if not isinstance(block.mixer, ContextParallel):
            raise TypeError(f"the mixer {type(block.mixer).__name__} does not support context parallelism")
    for part in _context_parts(model):
        part.set_context_group(group)


def _context_parts(model: LM) -> list[ContextParallel]:
    return [m for block in model.blocks for m in block.modules() if isinstance(m, ContextParallel)]


@contextlib.contextmanager
def without_context_parallel(model: LM):
    """Generation runs whole sequences on each rank: the context groups are lifted meanwhile."""
    parts = _context_parts(model)
    groups = [part.context_group for part in parts]
    for part in parts:
        part.set_context_group(None)
    try:
        yield
    finally:
        for part, group in zip(parts, groups):
            part.set_context_group(group)


def gradient_sync(trained: torch.nn.Module, sync: bool):
    """A context for one micro-batch; sync=False for every micro-batch but the last. DDP accumulates the
    gradients locally (no all-reduce) until the last. FSDP2 reduce-scatters every micro-batch and adds
    the shards: skipping it would keep every block's unsharded gradients until the last micro-batch (the
    whole model's, in fp32, on every rank: 28 GB at 7B); under HSDP only the all-reduce over the replicas
    waits for the last."""
    if isinstance(trained, DistributedDataParallel):
        return contextlib.nullcontext() if sync else trained.no_sync()
    if isinstance(trained, FSDPModule):
        trained.set_requires_all_reduce(sync)
    return contextlib.nullcontext()
