"""Embedding, LM head and loss are split over the vocabulary (Megatron's vocabulary parallelism): rank r holds
rows [r·V/tp, (r+1)·V/tp) of the embedding and of the head (tied: the embedding is the head, so both uses
share that split). The embedding looks up the tokens in its rows (zeros for the others) and the partial
sums are reduce-scattered straight to sequence shards under sequence parallelism, all-reduced without. The
final norm's output is whole on every rank (gathered from the sequence shards under sequence parallelism);
each rank computes the logits of its rows only and the loss is vocabulary-parallel (`LM.vocab_group`, the
tp group; kernels/cross_entropy.py: max and sum of exponentials all-reduced, the target logit from the rank
that holds it), chunk by chunk, so no rank holds more than chunk × V/tp logits. Each rank's gradient of the
norm's output is then its rows' part: the backward reduce-scatters it to the sequence shards (all-reduces it
without sequence parallelism). Without targets the LM returns the logits all-gathered over the vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from unroll.models.lm import LM
from unroll.train.parallel.tensor_parallel.collectives import AllReduceGrad
from unroll.train.parallel.tensor_parallel.layout import Layout, TensorParallelError
from unroll.train.parallel.tensor_parallel.style import Sharded

if TYPE_CHECKING:
    from unroll.train.parallel.pipeline_stages import StageModule


def shard_root(root: LM | StageModule, tp_mesh: DeviceMesh, sp: bool) -> None:
    """The embedding, final norm and head of the LM (or of a pipeline stage, where it holds them, and a
    last stage's replica of a tied embedding): embedding and head split over the vocabulary, the loss
    vocabulary-parallel (`root.vocab_group`); their forward on the local views."""
    params: dict[str, Layout] = {}  # the [V, d] matrices: vocabulary rows [r·V/tp, (r+1)·V/tp) on rank r
    local: dict[str, object] = {}
    embed, norm = getattr(root, "embed", None), getattr(root, "norm", None)
    if isinstance(embed, nn.Embedding):
        params["embed.weight"] = Shard(0)
        local["embed.forward"] = partial(_vocab_parallel_embedding, embed, tp_mesh, sp)
    if getattr(root, "head", None) is not None:
        params["head.weight"] = Shard(0)
    if getattr(root, "tied_embed_weight", None) is not None:
        params["tied_embed_weight"] = Shard(0)
    if isinstance(norm, nn.Module):
        if sp:
            parallelize_module(norm, tp_mesh, SequenceParallel())
            norm.register_forward_hook(_gather_sequence)
        else:
            params["norm.weight"] = Replicate()
            norm.register_forward_hook(partial(_sum_grad_over_ranks, group=tp_mesh.get_group()))
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
    return AllReduceGrad.apply(out, group)
