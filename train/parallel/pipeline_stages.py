"""Pipeline stages as modules: one stage of the LM holding the model's own blocks, and the sum of the
gradients of a tied embedding's two copies.

The loss: the last stage computes it itself from its hidden states (train/loss.py `hidden_loss`, as
`LM.forward(tokens, targets=...)` does), so the head is used inside the stage's forward (where FSDP has
gathered it) and the full logits are never held; the targets reach it as a keyword argument of the
schedule's step. MoE balancing losses computed inside a stage join the backward at that stage's output
(train/loss.py `with_moe_loss`), so pipelined gradients equal single-device training on loss + aux.

Tied embeddings: the last stage computes logits with the embedding matrix that the first stage looks tokens
up in. The last stage gets its own replica of it (the parameter `tied_embed_weight`, a copy of
`model.embed.weight` at build time), on every placement, even when both stages are on one rank (a shared
Parameter object would be divided twice by the schedule's per-stage `scale_grads`). `sync_tied_grads` then
sets the gradient of both copies to their sum (point to point between the two ranks, or locally under V
placement), which is the single-device gradient of the tied weight; identical gradients and identical
optimizer updates keep the copies equal. So the replica has optimizer state of its own (identical to the
embedding's), and a global gradient norm must count the tied weight once (skip `tied_embed_weight`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from unroll.kernels.cross_entropy import gather_vocab
from unroll.models.lm import LM
from unroll.models.moe import MoE, balancing_loss
from unroll.train.loss import hidden_loss, with_moe_loss
from unroll.train.parallel.pipeline_split import schedule_spec, stage_layers, stage_ranks


class StageModule(nn.Module):
    """One pipeline stage: the embedding on the first, the LM's own Block objects for `layers` (under their
    LM names, `blocks.<i>`), the final norm and head on the last. forward: tokens or hidden → hidden, or on
    the last stage the loss (given targets) or logits."""

    def __init__(self, model: LM, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.layers, self.first, self.last = list(layers), first, last
        self.embed: nn.Embedding | None = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm: nn.RMSNorm | None = model.norm if last else None
        self.head: nn.Linear | None = model.head if last else None
        self.tied = model.head is None
        self.tied_embed_weight: nn.Parameter | None = None  # one stage (first and last) uses embed.weight itself
        if last and self.tied and not first:
            self.tied_embed_weight = nn.Parameter(model.embed.weight.detach().clone())
        self.tied_peer: int | None = None  # pp-group rank holding the other copy of the tied weight
        self.stage_index, self.n_stages = 0, 1  # set by build_stage_modules
        self.lm_rules = model.init_rules()  # the embedding's and head's initialisation (models/init.py)
        # the loss as the LM computes it (models/lm.py): tokens per logits chunk; the vocabulary's process
        # group under tensor parallelism (set by train/parallel/tensor_parallel/vocab.py)
        self.loss_chunk, self.vocab_group = model.loss_chunk, model.vocab_group
        self.aux_losses: list[torch.Tensor] = []  # this stage's MoE losses, one per microbatch (for logging)

    def init_rules(self) -> dict:
        """The LM's own rules; the tied replica draws the embedding's numbers, so it starts equal to it."""
        rules = dict(self.lm_rules)
        if self.tied_embed_weight is not None:
            rules["tied_embed_weight"] = replace(rules["embed.weight"], key="embed.weight")
        return rules

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE balancing losses of this stage's blocks in the last forward (None without MoE layers)."""
        return balancing_loss([b.mlp for b in self.blocks.values() if isinstance(b.mlp, MoE)])

    def output_weight(self) -> torch.Tensor:
        """The last stage's [V, d] logits matrix: the head's, or (tied) the replica or the embedding itself."""
        if self.head is not None:
            return self.head.weight
        if self.tied_embed_weight is not None:
            return self.tied_embed_weight
        assert self.embed is not None, "a last stage without a head is tied: it holds the replica or the embedding"
        return self.embed.weight

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, resets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (first stage) or hidden [B, T, d] → hidden [B, T, d]; on the last stage logits [B, T, V], or
        with targets [B, T] the mean cross-entropy as a tensor of shape [1] (the schedules merge the last
        stage's outputs along dim 0). Other stages ignore targets: the schedule gives a rank's keyword
        arguments to each of its stages."""
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x, _ = block(x, None, resets)
        aux = self.aux_loss()
        if aux is not None:
            self.aux_losses.append(aux.detach())
            if torch.is_grad_enabled():
                x = with_moe_loss(x, aux)
        if not self.last:
            return x
        assert self.norm is not None, "the last stage holds the final norm"
        x = self.norm(x)
        if targets is None:
            logits = F.linear(x, self.output_weight())
            return logits if self.vocab_group is None else gather_vocab(logits, self.vocab_group)
        # the head is used here, inside the stage's forward, where FSDP has gathered it
        loss = hidden_loss(x, self.output_weight(), targets, self.loss_chunk, self.vocab_group)
        return torch.stack([loss])  # not a view: the schedules detach the last stage's outputs in place

    def tied_weight(self) -> torch.Tensor | None:
        """This stage's copy of the tied embedding matrix (None if it holds none or the model is untied)."""
        if not self.tied or self.first == self.last:
            return None
        if self.first:
            assert self.embed is not None, "the first stage holds the embedding"
            return self.embed.weight
        return self.tied_embed_weight


def build_stage_module(model: LM, layers: list[int], first: bool, last: bool) -> StageModule:
    """A module running blocks `layers` of `model` (the same objects, not copies), with the embedding when
    `first` and the final norm and head when `last`; tied embeddings get a replica on the last stage (see the
    module docstring)."""
    return StageModule(model, layers, first, last)


def pp_group(pp) -> dist.ProcessGroup:
    """The pipeline's process group: `pp` itself, a 1-d mesh's group, a mesh's "pp" dimension's, or (None) the world."""
    if isinstance(pp, DeviceMesh):
        if pp.ndim == 1:
            return pp.get_group()
        if pp.mesh_dim_names and "pp" in pp.mesh_dim_names:
            return pp["pp"].get_group()
        raise ValueError(f"a {pp.ndim}-d mesh without a 'pp' dimension: pass the pp sub-mesh or its group")
    group = pp if pp is not None else dist.group.WORLD
    assert group is not None, "torch.distributed is initialised before a pipeline is built"
    return group


def build_stage_modules(model: LM, pp, schedule: str) -> list[StageModule]:
    """This rank's stage modules, in stage order, for `schedule` over the pipeline group `pp` (a process
    group, a 1-d mesh, or a mesh with a "pp" dimension). Each has `stage_index`, `n_stages` and
    `tied_peer` set. They hold the model's own blocks, embedding, norm and head: wrap them (FSDP) before
    a schedule runs them."""
    _, _, per_rank, placement = schedule_spec(schedule)
    group = pp_group(pp)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    n_stages = size * per_rank
    layers = stage_layers(model.cfg, n_stages)
    owner = stage_ranks(n_stages, size, placement)
    modules = []
    for s in range(n_stages):
        if owner[s] != rank:
            continue
        m = build_stage_module(model, layers[s], s == 0, s == n_stages - 1)
        m.stage_index, m.n_stages = s, n_stages
        m.tied_peer = owner[n_stages - 1] if s == 0 else owner[0]
        modules.append(m)
    return modules


def sync_tied_grads(modules: list[StageModule], pp) -> None:
    """Sum the gradients of the two copies of a tied embedding matrix (first stage's `embed.weight`, last
    stage's `tied_embed_weight`) into both, point to point between their ranks. Every pp rank may call it;
    ranks holding neither copy do nothing. A no-op for untied models."""
    group = pp_group(pp)
    mine = [(m, w) for m in modules if (w := m.tied_weight()) is not None]
    if not mine:
        return
    grads = []
    for _, w in mine:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        grads.append(w.grad)
    if len(mine) == 2:  # V placement: both copies here
        total = grads[0] + grads[1]
        for g in grads:
            g.copy_(total)
        return
    m = mine[0][0]
    # under FSDP both copies are sharded alike over the data-parallel ranks: peers swap their local shards
    grad = grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]
    other = torch.empty_like(grad)
    assert m.tied_peer is not None, "build_stage_modules sets the tied peer"
    peer = dist.get_global_rank(group, m.tied_peer)
    ops = [dist.P2POp(dist.isend, grad.contiguous(), peer, group), dist.P2POp(dist.irecv, other, peer, group)]
    if not m.first:
        ops.reverse()
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    grad.add_(other)
