"""Which optimizer steps are applied.

A step is judged after its backward pass and before the optimizer, on figures every rank holds alike (the
loss all-reduced over the ranks, the global gradient norm), so that all ranks reach the same verdict:
  - a loss or gradient norm that is not finite: the step is not applied (no optimizer update, no expert-bias
    update); its data counts as consumed and training goes on with the next batch;
  - a loss spike (`train.spike_factor` k > 0): a loss above k × the median loss of the last
    `train.spike_window` applied steps. The median, not the mean, so that one earlier spike does not raise the
    bar; the ratio, not a difference, so that k means the same early and late in training; no verdict until
    the window is full, so the first, quickly falling losses of a run are never taken for spikes. Its policy
    (`train.spike_policy`) is `skip` (as a non-finite step) or `rollback`: the trainer reloads the newest good
    checkpoint and goes on with the data after the spike's batch, so no sample is trained on twice.
Steps not applied in a row are counted; `train.max_bad_steps` of them stop the run (a model that keeps
producing them is diverging, and skipping forever would only burn the allocation). Steps redone after a
rollback do not end the count: only an applied step past the furthest step reached does.

The guard's figures (the window, the counts) travel in the checkpoint's train state, so that a resumed run
judges its steps as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

SPIKE_POLICIES = ("skip", "rollback")


class TrainingDiverged(RuntimeError):
    """`train.max_bad_steps` consecutive steps were not applied; the message says which and why."""


@dataclass
class Verdict:
    reason: str  # why the step is not applied, for the console and metrics.jsonl
    action: str  # "skip" | "rollback"


class StepGuard:
    def __init__(
        self, *, max_bad_steps: int, spike_factor: float = 0.0, spike_window: int = 100, spike_policy: str = "skip"
    ):
        self.max_bad_steps, self.spike_factor, self.spike_policy = max_bad_steps, spike_factor, spike_policy
        self.window = spike_window
        self.recent: deque[float] = deque(maxlen=spike_window)  # losses of the last applied steps
        self.streak = 0  # steps not applied since the last applied step past `furthest`
        self.first_bad: int | None = None  # the step that began the streak
        self.furthest = 0  # the furthest step completed (a rollback goes back below it)
        self.skipped = 0  # steps not applied over the whole run
        self.rollbacks = 0

    def judge(self, loss: float, grad_norm: float | None) -> Verdict | None:
        """None when the step is to be applied."""
        if not math.isfinite(loss):
            return Verdict(f"loss is {loss}", "skip")
        if grad_norm is not None and not math.isfinite(grad_norm):
            return Verdict(f"gradient norm is {grad_norm}", "skip")
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return Verdict(
                    f"loss spike: {loss:.4f} > {self.spike_factor:g} × {median:.4f} (the median of the "
                    f"last {len(self.recent)} applied steps)",
                    self.spike_policy,
                )
        return None

    def applied(self, step: int, loss: float) -> None:
        self.recent.append(loss)
        if step > self.furthest:
            self.streak, self.first_bad = 0, None
        self.furthest = max(self.furthest, step)

    def rejected(self, step: int, verdict: Verdict) -> None:
        """Counts a step not applied; raises TrainingDiverged at the max_bad_steps-th in a row."""
        self.skipped += 1
        self.streak += 1
        self.first_bad = step if self.first_bad is None else self.first_bad
        self.furthest = max(self.furthest, step)
        if self.streak >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.streak} steps in a row not applied (train.max_bad_steps={self.max_bad_steps}), from step "
                f"{self.first_bad} to step {step}; the last: {verdict.reason}. The run stops; its checkpoints are "
                f"kept, and resuming (with a lower optim.lr, a longer warmup, or stronger clipping) starts from the "
                f"newest one"
            )

    def state_dict(self) -> dict:
        return {
            "recent": list(self.recent),
            "streak": self.streak,
            "first_bad": self.first_bad,
            "furthest": self.furthest,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint from before the guard: nothing was skipped then
            return
        self.recent.clear()
        self.recent.extend(state["recent"][-self.window :])
        self.streak, self.first_bad, self.furthest = state["streak"], state["first_bad"], state["furthest"]
        self.skipped, self.rollbacks = state["skipped"], state["rollbacks"]

    def rolled_back(self, saved: dict | None) -> None:
        """After a rollback: the window as it was at the checkpoint (the median the run had there); the
        counts keep the history, so a run that keeps spiking after rollbacks still reaches max_bad_steps."""
        self.rollbacks += 1
        self.recent.clear()
        if saved:
            self.recent.extend(saved["recent"][-self.window :])
