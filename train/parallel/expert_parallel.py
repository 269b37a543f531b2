"""Expert parallelism for the single-device MoE (models/moe.py), on plain torch.distributed collectives.

    apply_expert_parallel(moe, ep_group)            # one MoE module, in place
    apply_expert_parallel_to_model(model, ep_group)  # every MoE of an LM (or any module tree)

Layout over the ep group (size ep, ep | n_experts; rank i = ep_group rank):

    w_gate_up  [E/ep, d, 2h]   per-rank DISTINCT: rank i holds experts [i·E/ep, (i+1)·E/ep)
    w_down     [E/ep, h, d]    per-rank DISTINCT: the same block
    router.weight, expert_bias, shared.*        REPLICATED (and every non-MoE parameter of the model:
                                                 norms, mixers, embedding, head)

The parameter names are unchanged (a state dict saved under EP holds this rank's block under the
single-device names: gather or reshard it before loading into another layout). `n_experts` stays the
global count (the router and the load statistics are over all experts). The module stays a MoE: its
`expert_exchange` becomes an `ExpertParallel` (group, rank, size, n_local, offset), which MoE.forward
calls between its own routing and combine, and which runs the module's own `compute_experts` on the
rows its experts receive. `inactive_params` (and so LM's active-parameter count) is not adjusted: on an
EP rank it subtracts the global (E - k) experts from the local parameter count.

Forward of one EP MoE on T local tokens, k experts each (N = T·k assignments), all in ep_group:

    1. route locally exactly as the single-device module (MoE.route (router and bias replicated; aux_loss,
       last_load, load_since_update from this rank's tokens only); MoE.forward then
    2. sort the N assignments by expert (stable); assignments for rank j's experts are then one
       contiguous slice, itself grouped by expert
    3. all_to_all_single of the per-expert counts [E] int64, equal splits (E/ep each): each rank
       learns how many rows each source sends to each of its local experts   -> 8·E bytes sent per rank
    4. one host read of those counts (split sizes must be host ints; on GPU this is a sync)
    5. all_to_all_single of the sorted token activations [N, d], uneven splits, in the compute dtype
       (the autocast dtype when autocast is on)                               -> N·d·itemsize bytes
    6. regroup the received rows (laid out [source][local expert]) by local expert, run the local
       experts (MoE.compute_experts: torch._grouped_mm when supported, else a per-expert loop; the
       loop when no rows arrived, as torch._grouped_mm's backward fails on zero rows), and undo the
       regrouping
    7. all_to_all_single back (the inverse splits)                            -> N·d·itemsize bytes
    8. MoE.forward weights by the combine weights and index_adds into token order (in x's dtype), adds
       the shared experts: the single-device tail

Backward: the two activation exchanges are an autograd.Function whose backward is the inverse
all_to_all_single (the gradients contiguous), so two more all_to_all_single of N·d·itemsize bytes each;
the count exchange carries no gradient. Per MoE layer and step: 3 collectives forward (1 tiny), 2
backward. Every rank must run both backward exchanges of every layer in the same order, which holds
when all ranks build the same graph (the same layers, the same requires_grad) — the normal case; a
rank with no tokens, or whose experts receive none, still takes part (empty slices).

Gradients and how a trainer must reduce them
--------------------------------------------
After backward on rank r (loss_r on its own tokens):
  * expert parameters (w_gate_up, w_down): the COMPLETE gradient of Σ_r loss_r for this rank's experts
    (every rank's tokens that were routed there, their gradients brought back by the exchange). Do NOT
    all-reduce them over the ep group (they are different experts). If the experts are also replicated
    over other (data-parallel) ranks outside the ep group, reduce over those replicas as usual.
  * replicated parameters (router, shared experts, everything else): only rank r's part, d loss_r.
    They must be reduced over the ep group as data-parallel gradients are (the ep ranks hold different
    tokens).
Convention: the trainer averages replicated gradients over its data ranks, each loss_r being a local
mean, so the step is on mean_r loss_r. The expert gradients are d(Σ_r loss_r) = ep · d(mean_r loss_r)
over the ep group, so sum them over the expert replicas (dp outside ep), if any, and divide by the
number of data ranks (`average_expert_grads`, after backward, before clipping): an expert gradient is
then the sum over every data rank's loss divided by the number of data ranks, as a replicated one is
(`scale_expert_grads(model, 1 / ep)` alone when ep is all the data ranks). If the trainer instead SUMS replicated gradients (loss = Σ_r loss_r), leave the expert
gradients as they are. A DDP wrapper spanning the ep ranks must not reduce the expert parameters
(exclude them, e.g. DistributedDataParallel._set_params_and_buffers_to_ignore_for_model with the names
from `expert_parameters`); FSDP must not shard them over ep (the trainer has FSDP ignore them and
averages them itself).

Gradient clipping must take the global norm with the expert part summed over the ep group (each
rank's experts are distinct) and the replicated part counted once. The aux-loss-free bias update
should use load_since_update all-reduced over every rank that routes tokens (ep included), as under DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from unroll.models.moe import MoE

EXPERT_PARAMS = ("w_gate_up", "w_down")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of the rows of x, uneven splits; backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single over dim 0: send in_splits[j] rows to rank j, receive out_splits[j]
    rows from rank j."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


@dataclass
class ExpertParallel:
    """A MoE's expert exchange (models/moe.py's ExpertExchange) when its routed experts are split over
    `group`: this rank holds experts [offset, offset + n_local). Set by apply_expert_parallel."""

    group: Any  # the ep process group
    rank: int
    size: int
    n_local: int
    offset: int
    mesh: DeviceMesh | None = None  # the 2-D (edp, ep) mesh, once tag_expert_parameters is given one

    def __call__(self, moe: MoE, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Steps 3-7 of the module docstring: rows [N, d] sorted by expert, counts [E] -> their experts'
        outputs, in rows' order."""
        ep, n_local, group = self.size, self.n_local, self.group
        # Per-expert counts to the experts' owners: recv[s, e] = rows source s sends to local expert e.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=group)
        recv = recv.view(ep, n_local)
        local_counts = recv.sum(0)
        host = torch.cat([counts.view(ep, n_local).sum(1), recv.sum(1), local_counts]).tolist()  # one sync
        in_splits, out_splits, sizes = host[:ep], host[ep : 2 * ep], host[2 * ep :]

        received = all_to_all_rows(rows, out_splits, in_splits, group)
        # Received rows are [source][local expert]; the experts want [local expert][source].
        expert_of_row = (
            torch.arange(n_local, device=rows.device)
            .repeat(ep)
            .repeat_interleave(recv.flatten(), output_size=sum(out_splits))
        )
        perm = expert_of_row.argsort(stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        y = moe.compute_experts(received[perm], local_counts, sizes)[inv]
        return all_to_all_rows(y, in_splits, out_splits, group)


def expert_parallel_of(m: nn.Module) -> ExpertParallel | None:
    """The expert-parallel exchange of `m` if it is an expert-parallel MoE, else None."""
    exchange = m.expert_exchange if isinstance(m, MoE) else None
    return exchange if isinstance(exchange, ExpertParallel) else None


def apply_expert_parallel(moe: MoE, ep_group) -> None:
    """Make `moe` expert-parallel over ep_group in place (see the module docstring). Every rank must call
    it on an identically initialised module (the same seed, or weights loaded/broadcast beforehand):
    each keeps its own contiguous block of E/ep experts and drops the rest."""
    if not isinstance(moe, MoE):
        raise TypeError(f"expected a MoE, got {type(moe).__name__}")
    if moe.expert_exchange is not None:
        raise ValueError("this MoE is already expert-parallel")
    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    if moe.n_experts % ep:
        raise ValueError(f"n_experts={moe.n_experts} is not divisible by the expert-parallel size {ep}")
    n_local = moe.n_experts // ep
    lo = rank * n_local
    for name in EXPERT_PARAMS:
        full = getattr(moe, name)
        local = nn.Parameter(full.detach()[lo : lo + n_local].clone(), requires_grad=full.requires_grad)
        setattr(moe, name, local)
    moe.expert_exchange = ExpertParallel(ep_group, rank, ep, n_local, lo)


def apply_expert_parallel_to_model(model: nn.Module, ep_group) -> int:
    """apply_expert_parallel on every MoE in `model` (an LM or any module tree); returns how many."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.expert_exchange is None]
    for m in moes:
        apply_expert_parallel(m, ep_group)
    return len(moes)


def tag_expert_parameters(model: nn.Module, ep_mesh=None) -> None:
    """Marks every expert-parallel MoE's expert tensors with what the rest of training needs to know of
    them: `ep_mesh` (the 2-D (edp, ep) mesh: clipping, gradient averaging and checkpoints use it) and
    `global_rows` (experts in the whole tensor, first expert held: initialisation uses it). Given a mesh,
    the MoEs remember it; without, the tags are renewed from the MoEs (after `to_empty` replaced the
    parameter objects)."""
    for m in model.modules():
        ep = expert_parallel_of(m)
        if ep is None:
            continue
        if ep_mesh is not None:
            ep.mesh = ep_mesh
        for name in EXPERT_PARAMS:
            p = getattr(m, name)
            p.global_rows = (m.n_experts, ep.offset)
            if ep.mesh is not None:
                p.ep_mesh = ep.mesh


def expert_mesh(param: torch.Tensor) -> DeviceMesh:
    """The 2-D (edp, ep) mesh of an expert tensor, as `tag_expert_parameters` marked it."""
    mesh = getattr(param, "ep_mesh", None)
    if not isinstance(mesh, DeviceMesh):
        raise AssertionError("an expert tensor without its ep mesh: tag_expert_parameters was not given one")
    return mesh


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the per-rank distinct expert weights of every expert-parallel MoE in `model`;
    every other parameter of the model is replicated over the ep group."""
    out = []
    for prefix, m in model.named_modules():
        if expert_parallel_of(m) is not None:
            out += [(f"{prefix}.{n}" if prefix else n, getattr(m, n)) for n in EXPERT_PARAMS]
    return out


@torch.no_grad()
def average_expert_grads(model: nn.Module, replica_group, dp: int) -> None:
    """The expert gradients as FSDP's average over the dp data ranks: each ep group's sum over its
    tokens, summed over the groups replicating these experts (`replica_group`, None when there are
    none), divided by dp."""
    for _, p in expert_parameters(model):
        if p.grad is None:
            continue
        if replica_group is not None:
            dist.all_reduce(p.grad, group=replica_group)
        p.grad.div_(dp)


@torch.no_grad()
def scale_expert_grads(model: nn.Module, factor: float) -> None:
    """Multiply the expert parameters' gradients by `factor` (e.g. 1/ep: see the module docstring)."""
    for _, p in expert_parameters(model):
        if p.grad is not None:
            p.grad.mul_(factor)
