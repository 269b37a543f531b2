"""SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step; a second one exits at once.
SIGUSR1 asks the same and never escalates: it is the preemption warning (SLURM's `--signal`, forwarded by
unroll.launch.slurm's batch script), which reaches a trainer twice under torchrun (from SLURM, which
signals every process of the job step, and from torchrun's agent, which forwards it)."""
from __future__ import annotations

import signal

ESCALATING = (signal.SIGTERM, signal.SIGINT)
PREEMPTION = signal.SIGUSR1


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._escalating = False  # a SIGTERM / SIGINT came already
        self._previous = {}
        for sig in (*ESCALATING, PREEMPTION):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum in ESCALATING:
            if self._escalating:  # asked twice: give up on the checkpoint
                self.restore()
                signal.raise_signal(signum)
                return
            self._escalating = True
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
