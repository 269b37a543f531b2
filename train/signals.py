"""SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step; a second one exits at once.
SIGUSR1 asks the same and never escalates: it is the preemption warning (SLURM's `--signal`, forwarded by
unroll.launch.slurm's batch script).

Under torchrun on SLURM one request arrives twice: SLURM signals every process of the job step and
torchrun's agent forwards what it receives to its ranks. So a second SIGTERM / SIGINT within
`repeat_window_s` of the first is the same request, not an order to give up on the checkpoint."""

from __future__ import annotations

import signal
import time

ESCALATING = (signal.SIGTERM, signal.SIGINT)
PREEMPTION = signal.SIGUSR1


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
