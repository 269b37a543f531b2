"""torch.distributed.pipelining's stage metadata exchange, answered in a fake world (see train/fake_comm.py).

At a schedule's first step, torch 2.13's `PipelineStage`
  1. votes whether every stage was given static metadata (input_args/output_args): an int32 passed
     stage 0 → N−1 by send/recv and the product sent back. Under SymmetricWorld the receives read zeros,
     so the vote is DYNAMIC — what the real job decides too when any stage lacks static metadata, as the
     stages of train/pipeline.py do (they are built without input_args/output_args). Stages that all have
     static metadata would be STATIC in the real job; in the fake world they still run the DYNAMIC
     inference below once (one extra forward and backward on the first microbatch's shapes).
  2. DYNAMIC: each stage receives its input metadata from the previous stage (`recv_object_list` of a
     `_StageForwardMeta`), runs its forward on empty tensors of those shapes, sends its output metadata
     on; then the output-gradient metadata flows back (`_StageBackwardMeta`).

The receives of step 2 carry what another rank computed; SymmetricWorld leaves an object receive as the
caller passed it ([None]), which PipelineStage rejects. `stage_metadata_answers(activation)` patches
`PipelineStage._recv_meta` while it is active:

    forward, from stage s−1   the caller's example of stage s−1's outputs: `activation` (a tensor or a
                              tuple, meta tensors welcome), or activation(s−1) when it is callable; they
                              require grad when the schedule runs a backward
    backward, from stage s+1  the gradients of this stage's own outputs: their shapes and dtypes, which
                              the stage has just computed (exact; plain tensors only — a DTensor output's
                              gradient metadata is not derived, as torch's static path does not either)

For the LM of train/pipeline.py every boundary carries the hidden state: activation =
torch.empty(micro_batch, seq_len, d_model, dtype=<its dtype>, device="meta").
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import (
    _derive_grad_metas,
    _StageBackwardMeta,
    _StageForwardMeta,
    extract_tensor_metas,
)

Activation = torch.Tensor | tuple[torch.Tensor, ...]


@contextmanager
def stage_metadata_answers(activation: Activation | Callable[[int], Activation]) -> Iterator[None]:
    """Answer every PipelineStage's metadata receive while active (module docstring)."""
    original = PipelineStage._recv_meta

    def recv_meta(stage: PipelineStage, src_stage: int):
        if src_stage == stage.stage_index - 1:
            example = activation(src_stage) if callable(activation) else activation
            example = example if isinstance(example, tuple) else (example,)
            grad = stage.has_backward
            example = tuple(t.detach().requires_grad_(grad and t.is_floating_point()) for t in example)
            return _StageForwardMeta(forward_metas=extract_tensor_metas(example))
        if src_stage == stage.stage_index + 1:
            outputs = stage._stage_meta.outputs
            if outputs is None:
                raise RuntimeError(f"stage {stage.stage_index}: its output metadata is not known yet")
            return _StageBackwardMeta(backward_metas=_derive_grad_metas(outputs))
        raise RuntimeError(f"stage {stage.stage_index} asked for metadata from stage {src_stage}")

    PipelineStage._recv_meta = recv_meta
    try:
        yield
    finally:
        PipelineStage._recv_meta = original
