"""SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step; a second one exits at once.
SIGUSR1 asks the same and never escalates: it is the preemption warning (SLURM's `--signal`, forwarded by
unroll.launch.slurm's batch script).

Under torchrun on SLURM one request arrives twice: SLURM signals every process of the job step and
torchrun's agent forwards what it receives to its ranks. So a second SIGTERM / SIGINT within
`repeat_window_s` of the first is the same request, not an order to give up on the checkpoint.

`pause_for_signal` is a hook for tests only: it holds a run at a named step until a signal comes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ESCALATING = (signal.SIGTERM, signal.SIGINT)
PREEMPTION = signal.SIGUSR1
PAUSE_AT_STEP = "UNROLL_PAUSE_AT_STEP"  # the test hook of `pause_for_signal`
PAUSE_POLL_S = 0.01


class StopRequest:
    def __init__(self, repeat_window_s: float = 1.0) -> None:
        self.signum: int | None = None
        self.repeat_window_s = repeat_window_s
        self._escalating_at: float | None = None  # when the first SIGTERM / SIGINT came
        self._previous = {}
        for sig in (*ESCALATING, PREEMPTION):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum in ESCALATING:
            now = time.monotonic()
            if self._escalating_at is None:
                self._escalating_at = now
            elif now - self._escalating_at >= self.repeat_window_s:  # asked twice: give up on the checkpoint
                self.restore()
                signal.raise_signal(signum)
                return
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pause_marker(run_dir: Path, step: int, rank: int) -> Path:
    return Path(run_dir) / f"paused-at-step-{step}.rank{rank}"


def pause_for_signal(step: int, run_dir: Path, stop: StopRequest, rank: int) -> None:
    """A test hook, so that a test signals a run at a step it knows instead of whenever its signal lands.

    With UNROLL_PAUSE_AT_STEP=N in the environment, each rank, once step N is done (logged and validated,
    before the loop asks whether to stop and checkpoint), writes its process id to `pause_marker(run_dir,
    N, rank)` and waits until a signal asks it to stop (or one ends it). A test waits for the markers, then
    signals: the run stops, or dies, at step N exactly. Unset (every real run), it costs one look-up of the
    environment per step."""
    if os.environ.get(PAUSE_AT_STEP) != str(step):
        return
    marker = pause_marker(run_dir, step, rank)
    partial = marker.with_name(marker.name + ".tmp")
    partial.write_text(str(os.getpid()))
    partial.replace(marker)  # a test that sees the marker reads the whole process id
    while not stop.requested:
        time.sleep(PAUSE_POLL_S)
