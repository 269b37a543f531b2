"""Waiting for a run held by the trainer's test hook (UNROLL_PAUSE_AT_STEP, unroll.train.signals): a test
signals the run only once every rank has paused, so the step it stops or dies at is known."""

import time
from collections.abc import Callable
from pathlib import Path

from unroll.train.signals import PAUSE_AT_STEP, pause_marker


def pause_env(env: dict, step: int) -> dict:
    """`env` for a run whose ranks pause after step `step` until a signal comes."""
    return dict(env, **{PAUSE_AT_STEP: str(step)})


def wait_for_pause(
    run_dir: Path, step: int, ranks: int = 1, running: Callable[[], bool] = lambda: True, timeout: float = 300
) -> list[int]:
    """The process ids of ranks 0..ranks-1 once each has paused after `step`. Fails as soon as
    `running()` turns false; `timeout` only bounds the wait, so that a run that never pauses fails."""
    markers = [pause_marker(run_dir, step, rank) for rank in range(ranks)]
    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in markers):
        assert running(), f"the run ended before every rank paused at step {step}"
        assert time.monotonic() < deadline, f"not every rank paused at step {step} within {timeout} s"
        time.sleep(0.05)
    return [int(m.read_text()) for m in markers]


def parent_pid(pid: int) -> int:
    """The parent of process `pid` (Linux /proc): a torchrun rank's is its agent."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])
