"""Tensor parallelism (and sequence parallelism) for the single-device LM, applied from outside by a plan per
module type: a table of parameter name → layout over the 1-D `tp` mesh, as torchtitan's plans read.

    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)

How a module runs under its plan (`Sharded`, style.py): its parameters become DTensors laid out by the
table; its own forward, unchanged, runs on this rank's local shards (plain tensors), with the sizes it reads
(heads, width, ...) set to the local ones meanwhile. Communication happens only at its edges, as in
Megatron's column → row parallel pair:

    input   all-gathered (from the sequence shards under sequence parallelism; with a backward that
            reduce-scatters, or all-reduces, the gradient: every rank used all of it for its part)
    inside  nothing, except M²RNN's norm: one all-reduce of a [B, T, 1] sum of squares
    output  the out/down projection's partial sums, reduce-scattered back to sequence shards (or
            all-reduced without sequence parallelism)

So the recurrences run on local channels (ParaGRU/ParaLSTM) or local heads (M²RNN) with no communication
at all: every ParaRNN cell is elementwise in channels and every M²RNN head is independent. A Newton solve
decides convergence on its own rank's channels (each rank solves its own smaller system to the same
tolerance), so `last_solve` may differ between tp ranks.

Every parameter becomes a DTensor on the tp mesh (AdamW's foreach kernels and clip_grad_norm_ refuse a mix of
DTensors and plain tensors). Generation (`step`) under tensor parallelism is not supported.

The parts, by role:
  layout.py       a parameter's layout: a Placement, or `Fused` for a fused projection's segments
  style.py        `Sharded`, the ParallelStyle that runs a module's own forward on its local shards
  collectives.py  the autograd all-reduces the regions need beyond DTensor's redistribute
  plans.py        the plan of each mixer and MLP type
  vocab.py        embedding, LM head and loss split over the vocabulary
  placement.py    where FSDP2 shards a tp-sharded parameter (dp × tp)
Checkpoints keep the single-device layout: train/checkpoint/views.py. The private torch internals used here
and there, and why: train/parallel/dtensor_internals.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from unroll.models.lm import LM, Block
from unroll.train.parallel.tensor_parallel.layout import TensorParallelError, need
from unroll.train.parallel.tensor_parallel.plans import mixer_plan, mlp_plan
from unroll.train.parallel.tensor_parallel.style import Sharded
from unroll.train.parallel.tensor_parallel.vocab import shard_root

if TYPE_CHECKING:
    from unroll.train.parallel.pipeline_stages import StageModule


def apply_tensor_parallel(
    model: LM, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True, stages: list[StageModule] | None = None
) -> None:
    """Shards `model` in place over the 1-D mesh `tp_mesh` by the plans of plans.py. Call it before FSDP (and
    activation checkpointing / compile). Raises TensorParallelError naming what tp does not divide.
    Pipelined (`stages`, this rank's train/parallel/pipeline_stages.py stage modules): only their blocks are sharded, and
    each stage, whose forward replaces the LM's, runs on the local views of its embedding, norm and head."""
    if tp_mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh.ndim} dimensions")
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()  # where the residual stream lives between the blocks
    vocab, tp = model.cfg.vocab_size, tp_mesh.size()
    need(vocab % tp == 0, f"Embedding and LM head: tp={tp} must divide the vocabulary size {vocab}")
    blocks = [
        cast(Block, b) for b in (model.blocks if stages is None else [b for s in stages for b in s.blocks.values()])
    ]
    plans = [(block, mixer_plan(block.mixer, tp_mesh, seq), mlp_plan(block.mlp, tp_mesh, seq)) for block in blocks]
    for block, mixer_style, mlp_style in plans:  # all checked before anything is changed
        parallelize_module(block.mixer, tp_mesh, mixer_style)
        parallelize_module(block.mlp, tp_mesh, mlp_style)
        if sp:
            parallelize_module(block, tp_mesh, {"mixer_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
        else:
            parallelize_module(
                block,
                tp_mesh,
                Sharded({"mixer_norm.weight": Replicate(), "mlp_norm.weight": Replicate()}, row_parallel=False),
            )

    for root in [model] if stages is None else stages:
        shard_root(root, tp_mesh, sp)
    model.step = _no_generation  # type: ignore[method-assign]  # generation is refused on a tp-sharded LM

    for owner in [model] if stages is None else stages:
        plain = [name for name, p in owner.named_parameters() if not isinstance(p, DTensor)]
        if plain:
            raise AssertionError(f"tensor parallelism left parameters without a layout: {plain}")


def _no_generation(*args, **kwargs):
    raise NotImplementedError(
        "LM.step (generation) under tensor parallelism is not supported: generate from a checkpoint in one process"
    )
