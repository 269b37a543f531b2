"""Per-layer figures logged beside the loss: how each recurrence was solved, and the MoE experts' loads."""

from __future__ import annotations

import torch

from unroll.models import LM


def solver_metrics(model: LM) -> dict:
    """How each recurrent layer solved its recurrence in the last forward: Newton iterations, final
    relative residual, sequences solved after damped Newton steps (kernels/newton_damping.py) and sequences
    that needed the sequential fallback (0 iterations = sequential); the rest took plain Newton steps only."""
    row = {}
    for i, block in enumerate(model.blocks):
        info = getattr(block.mixer, "last_solve", None)
        if info is not None:
            row[f"layer{i}/newton_iters"] = info.iterations
            row[f"layer{i}/newton_residual"] = info.residual
            row[f"layer{i}/newton_damped"] = info.damped_sequences
            row[f"layer{i}/newton_fallbacks"] = info.fallback_sequences
    return row


def solve_iterations(model: LM) -> dict[int, int]:
    """Newton iterations of each recurrent layer's last solve, by layer (0 = solved sequentially); the layers
    this rank did not run (other pipeline stages) are absent."""
    out = {}
    for i, block in enumerate(model.blocks):
        info = getattr(block.mixer, "last_solve", None)
        if info is not None:
            out[i] = info.iterations
    return out


def load_metrics(model: LM, counts: torch.Tensor) -> dict:
    """Per MoE layer: each expert's share of the routed assignments relative to a perfectly even split
    (1.0 = balanced), as a list, and its maximum."""
    row = {}
    relative = counts * counts.shape[1] / counts.sum(dim=1, keepdim=True).clamp_min(1)
    for (i, _), load in zip(model.moe_layers(), relative.tolist()):
        row[f"layer{i}/expert_load"] = [round(x, 4) for x in load]
        row[f"layer{i}/expert_load_max"] = max(row[f"layer{i}/expert_load"])
    return row
