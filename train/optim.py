"""The optimizer and what acts on the gradients before it: AdamW's parameter groups, the trainable subset
(train.trainable), and gradient clipping over expert-parallel ranks."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from unroll.models.moe import MoE
from unroll.models.recurrent import HeadLinear
from unroll.train.config import Config, ConfigError
from unroll.train.parallel.expert_parallel import expert_mesh, expert_parameters


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`."""
    groups = parameter_groups(model, cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in AdamW groups (the trainer's and `unroll bench state-tracking`'s): weight
    decay on the matrices of Linear and Embedding layers (the fused input projections, gate rows included, and
    ParaGRU/ParaLSTM's head-blocked HeadLinear ones) and the MoE's stacked expert matrices; never on norms,
    biases, convolutions or the recurrences' own coefficients (ParaGRU/ParaLSTM's diagonal weights, M²RNN's W,
    A_log, dt_bias and D). The M²RNN authors' lm-engine excludes biases, norms, D, A_log and dt_bias too, but
    decays the convolution and M²RNN's W."""
    matrices = (torch.nn.Linear, torch.nn.Embedding, HeadLinear)  # HeadLinear: ParaGRU/ParaLSTM's input projection
    decay = {id(m.weight) for m in model.modules() if isinstance(m, matrices)}
    decay |= {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.w_gate_up, m.w_down)}
    decay |= {id(p) for name, p in model.named_parameters() if name == "embed.weight"}  # a pipeline's tied replica
    params = [p for p in model.parameters() if p.requires_grad]
    # The experts get a group of their own: under expert parallelism they are plain tensors beside
    # DTensors, which AdamW's foreach kernels do not mix. They get it under every layout, so that a run's
    # groups do not depend on its layout. (A DCP resume finds each parameter's moments by name and keeps the
    # groups and rates built here, whatever groups saved them: tests/test_checkpoint.py.)
    experts = {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.w_gate_up, m.w_down)}
    groups = [
        {
            "params": [p for p in params if id(p) in decay and id(p) not in experts],
            "weight_decay": weight_decay,
        },
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    if any(id(p) in experts for p in params):
        groups.append({"params": [p for p in params if id(p) in experts], "weight_decay": weight_decay})
    return groups


def apply_trainable(model: torch.nn.Module, pattern: str) -> int:
    """Freezes every parameter whose name does not match `pattern` (re.search); returns how many elements
    stay trainable. Frozen parameters are still in the model's checkpoints; the optimizer never sees them."""
    rx = re.compile(pattern)
    names = [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        p.requires_grad_(rx.search(name) is not None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError(
            f"train.trainable={pattern!r} matches no parameter (names look like {names[0]!r}, "
            f"{names[len(names) // 2]!r})"
        )
    return trainable


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; with expert parallelism the norm adds the experts' squares over the ep
    ranks (each holds different experts, plain tensors beside FSDP's DTensors) and each kind is scaled on
    its own (foreach kernels do not mix DTensors and tensors)."""
    experts = expert_parameters(model)
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ids = {id(p) for _, p in experts}
    shared = [p for p in model.parameters() if id(p) not in ids and p.grad is not None]
    local = [p for _, p in experts if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in shared if p.grad is not None])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    expert_sq = (
        torch.nn.utils.get_total_norm([p.grad for p in local if p.grad is not None]) ** 2
        if local
        else norm.new_zeros(())
    )
    # the ep group holds each expert once (its replicas, identical after averaging, are not counted)
    torch.distributed.all_reduce(expert_sq, group=expert_mesh(experts[0][1])["ep"].get_group())
    total = (norm**2 + expert_sq).sqrt()
    for group in (shared, local):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
