"""A per-rank watchdog for hangs outside a collective (`run.step_timeout_s`).

A rank stuck in a collective is ended by the collective's own timeout (run.collective_timeout_s); one stuck
elsewhere (a dataloader, a file system, a deadlock in a kernel launch) would hold the whole job forever. The
trainer re-arms the watchdog at the start of every iteration of its loop (the step with its logging,
validation and checkpoint); when an iteration runs past the timeout, the rank writes every thread's Python
stack to its stderr (its own log under torchrun) and exits with EXIT_CODE, so that the launcher ends the
job, or restarts it (`unroll launch ... --max-restarts N`).

Two timers, because a hang may hold the GIL: a Python thread that writes a line naming the setting and the
step before the stacks, and faulthandler's C-level timer, which needs no GIL, a grace period later as the
backstop.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

EXIT_CODE = 124  # as coreutils' `timeout`
BACKSTOP_S = 30.0
STDERR_FD = 2  # the descriptor, not sys.stderr: what replaces sys.stderr (a capture, a tqdm wrapper) may have none


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._timer: threading.Timer | None = None

    def arm(self, step: int) -> None:
        """(Re)starts the countdown for the iteration that completes step `step`."""
        if self.timeout_s <= 0:
            return
        self.disarm()
        self._timer = threading.Timer(self.timeout_s, self._expire, args=(step,))
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True, file=STDERR_FD)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            faulthandler.cancel_dump_traceback_later()

    def _expire(self, step: int) -> None:
        sys.stderr.flush()
        os.write(
            STDERR_FD,
            f"unroll: rank {self.rank}: step {step} has run longer than run.step_timeout_s="
            f"{self.timeout_s:g} s; the stack of every thread follows, then this rank exits {EXIT_CODE}\n".encode(),
        )
        faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
        os._exit(EXIT_CODE)
