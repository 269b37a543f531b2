"""Learning-rate schedules as a pure function of the step, so resuming needs only the step number."""

from __future__ import annotations

import math

from unroll.train.config import ScheduleConfig


def lr_at(step: int, peak: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup to `peak`, then
      cosine:   half a cosine from peak down to peak * min_lr_ratio at the last step;
      wsd:      warmup–stable–decay (Hu et al., 2024): flat at peak, then linear down to
                peak * min_lr_ratio over the last decay_fraction of the steps;
      constant: flat at peak.
    """
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    if cfg.name == "constant":
        return peak
    if cfg.name == "cosine":
        span = max(1, total_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {cfg.name!r}")
