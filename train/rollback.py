"""A step the guard (train/step_guard.py) did not apply: counted, logged, and for a rollback the newest good
checkpoint loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint.writer import CheckpointWriter
from unroll.train.metrics import Metrics
from unroll.train.step import StepResult
from unroll.train.step_guard import StepGuard


def not_applied(
    step: int, samples: int, result: StepResult, guard: StepGuard, metrics: Metrics, rollback: Callable[[], dict | None]
) -> int | None:
    """A step the guard did not apply: counted (TrainingDiverged at train.max_bad_steps in a row), logged as
    an event in metrics.jsonl and on the console; for a rollback, the newest good checkpoint loaded. Returns
    the step rolled back to, or None (the run goes on from here)."""
    verdict = result.verdict
    assert verdict is not None, "called for a step the guard did not apply"
    metrics.log(
        {
            "step": step,
            "event": "step_not_applied",
            "reason": verdict.reason,
            "action": verdict.action,
            "loss": result.loss,
            "grad_norm": result.grad_norm_value,
            "skipped_steps": guard.skipped + 1,
        }
    )
    guard.rejected(step, verdict)
    if verdict.action == "rollback":
        saved = rollback()
        if saved is not None:
            guard.rolled_back(saved.get("guard"))
            metrics.log(
                {
                    "step": step,
                    "event": "rollback",
                    "to_step": saved["step"],
                    "samples_skipped": [saved["samples_consumed"], samples],
                }
            )
            metrics.write(
                f"step {step} not applied ({verdict.reason}): rolled back to step {saved['step']}; "
                f"samples {saved['samples_consumed']}-{samples - 1} are not trained on again"
            )
            return saved["step"]
        metrics.write(f"step {step} not applied ({verdict.reason}): no checkpoint to roll back to yet, skipped")
        return None
    metrics.write(f"step {step} not applied ({verdict.reason}): skipped, {guard.skipped} so far")
    return None


def checkpoint_to_roll_back_to(
    run_dir: Path, owned: torch.nn.Module, optimizer: torch.optim.Optimizer, writer: CheckpointWriter, rank: int
) -> dict | None:
    """Collective: the newest good checkpoint loaded into the model and optimizer (a pending async save
    finished first: it is the newest); its train state, or None when the run has none yet."""
    writer.wait()
    return checkpoint.load_latest(run_dir, owned, optimizer, rank=rank, io_threads=writer.io_threads)
