"""Pipeline stages planned: the schedules, which blocks each stage holds, and which rank runs each stage.

Stage boundaries come from the pattern's `|` marks ("GA|LG": stage 0 holds blocks 0-1, stage 1 blocks 2-3)
when the marks give exactly the number of stages the schedule needs; a pattern without marks is balanced
automatically by parameter count (the embedding counted on the first stage, the head on the last).

Placement (which rank runs which stage, ranks counted within the pp group of size P):
    GPipe, 1F1B                                    one stage per rank: rank r runs stage r
    Interleaved1F1B, LoopedBFS, InterleavedZeroBubble  two per rank, looped: r and r + P
    ZBVZeroBubble, DualPipeV                       two per rank, V: r and 2P - 1 - r (so rank 0 runs
                                                   both the first and the last stage)
"""

from __future__ import annotations

import torch

from unroll.models.config import ModelConfig
from unroll.models.lm import Block
from unroll.train.parallel.mesh import Layout, LayoutError

# name: (class in torch.distributed.pipelining, stages per rank, placement). Named, not imported: importing
# torch.distributed.pipelining loads torch._dynamo, a second per process that runs without pp spends for nothing.
SCHEDULES = {
    "GPipe": ("ScheduleGPipe", 1, "loop"),
    "1F1B": ("Schedule1F1B", 1, "loop"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", 2, "loop"),
    "LoopedBFS": ("ScheduleLoopedBFS", 2, "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", 2, "v"),
    "DualPipeV": ("ScheduleDualPipeV", 2, "v"),
}


def schedule_spec(name: str) -> tuple[str, str, int, str]:
    """(canonical name, class name in torch.distributed.pipelining, stages per rank, placement) of a schedule
    name, case-insensitive."""
    for key, spec in SCHEDULES.items():
        if key.lower() == name.lower():
            return (key,) + spec
    raise ValueError(f"unknown pipeline schedule {name!r}; choices: {', '.join(SCHEDULES)}")


def stage_ranks(n_stages: int, pp: int, placement: str) -> list[int]:
    """The pp-group rank that runs each stage."""
    if placement == "v":
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]


def _marked_stages(pattern: str) -> list[list[int]]:
    out: list[list[int]] = [[]]
    layer = 0
    for c in pattern:
        if c == "|":
            out.append([])
        else:
            out[-1].append(layer)
            layer += 1
    return out


def layer_costs(cfg: ModelConfig) -> tuple[list[int], int, int]:
    """Parameter count of each block, of the embedding and of the head (the last stage's logits matrix,
    counted also when tied), from a meta-device build: no memory, no initialization cost."""
    with torch.device("meta"):
        blocks = [
            sum(p.numel() for p in Block(kind, cfg, mlp).parameters()) for kind, mlp in zip(cfg.layers, cfg.mlp_kinds)
        ]
    embed = cfg.vocab_size * cfg.d_model
    head = cfg.vocab_size * cfg.d_model + cfg.d_model  # + the final norm
    return blocks, embed, head


def balance(costs: list[int], stages: int, first: int = 0, last: int = 0) -> list[list[int]]:
    """Contiguous split of `costs` into `stages` non-empty parts minimizing the largest part's cost (`first`
    added to the first part, `last` to the last); ties go to the split with the earliest cut points."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i, j, s):  # layers i..j-1 as stage s
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == stages - 1 else 0)

    INF = float("inf")
    # best[s][j]: the smallest max cost of layers 0..j-1 in stages 0..s; cut[s][j]: where stage s starts
    best = [[INF] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], cost(i, j, s))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(stages - 1, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    bounds.append((0, j))
    return [list(range(i, j)) for i, j in reversed(bounds)]


def stage_layers(cfg: ModelConfig, stages: int) -> list[list[int]]:
    """The block indices each of `stages` pipeline stages holds: the pattern's `|` marks when it has any (they
    must give exactly `stages` stages, none empty), else a contiguous split balanced by parameter count."""
    n = len(cfg.layers)
    if stages < 1:
        raise ValueError(f"pipeline stages must be positive, got {stages}")
    if stages > n:
        raise ValueError(
            f"{stages} pipeline stages for {n} layers (pattern {cfg.pattern!r}): every stage needs at least one layer"
        )
    marks = cfg.pattern.count("|")
    if marks:
        if marks + 1 != stages:
            raise ValueError(
                f"pattern {cfg.pattern!r} has {marks} stage mark(s) '|', i.e. {marks + 1} stages, "
                f"but the pipeline needs {stages} (pp × stages per rank); move the marks or "
                f"remove them all for an automatic split"
            )
        split = _marked_stages(cfg.pattern)
        empty = [s for s, layers in enumerate(split) if not layers]
        if empty:
            raise ValueError(
                f"pattern {cfg.pattern!r}: stage(s) {empty} have no layers (a '|' at an end or two in a row)"
            )
        return split
    blocks, embed, head = layer_costs(cfg)
    return balance(blocks, stages, embed, head)


def check_microbatches(schedule: str, n_microbatches: int, pp_size: int) -> None:
    """What the schedule needs of the number of microbatches per step (torch checks only at the first step)."""
    name, _, per_rank, _ = schedule_spec(schedule)
    n_stages = pp_size * per_rank
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be positive, got {n_microbatches}")
    if name in ("1F1B", "DualPipeV") and n_microbatches < n_stages:
        raise ValueError(f"{name} needs at least as many microbatches as stages ({n_stages}), got {n_microbatches}")
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and n_microbatches % pp_size:
        raise ValueError(f"{name} needs n_microbatches divisible by the pp size {pp_size}, got {n_microbatches}")


def check_pipeline(layout: Layout, cfg, n_microbatches: int) -> None:
    """The schedule, the stage split and the microbatches, and what pipelining does not combine with yet,
    each by key (before any model is built)."""
    if layout.pp == 1:
        return
    try:
        name, _, per_rank, placement = schedule_spec(cfg.parallel.pp_schedule)
    except ValueError as e:
        raise LayoutError(f"parallel.pp_schedule: {e}") from None
    try:
        stage_layers(cfg.model, layout.pp * per_rank)
    except ValueError as e:
        raise LayoutError(
            f"parallel.pp={layout.pp} with parallel.pp_schedule={name} "
            f"({layout.pp * per_rank} stages), model.pattern: {e}"
        ) from None
    try:
        check_microbatches(name, n_microbatches, layout.pp)
    except ValueError as e:
        raise LayoutError(
            f"parallel.pp_schedule={name}: {e}; the microbatches are the per-rank batch over train.micro_batch_size"
        ) from None
    if placement == "v" and cfg.model.tie_embeddings:
        raise LayoutError(
            f"parallel.pp_schedule={name} places the first and last stage on one rank, which "
            f"with model.tie_embeddings=true is not available yet; use a looped schedule "
            f"(GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble)"
        )
