"""The timing harness every `unroll bench` uses, built to hold on a shared machine.

A load change (another job starting, a core taken) lands on whatever is being timed at that moment. So
the compared paths alternate round by round (A B A B ...) rather than one path's repeats running before
the other's, every figure is reported as the minimum and the median over the rounds (the minimum is the
least disturbed run; the median shows how much the rest moved), and ratios come from figures of the same
run. At the start every bench prints the load average and the torch thread count, and warns on stderr
when the machine is oversubscribed, where its figures say more about the other jobs than about the code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

ROUNDS = 5
RATIOS_OF = "medians"  # every bench's ratios are of the paths' medians; printed beside them


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """One path's seconds, one per round."""

    seconds: list[float]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def ratio(a: Timing, b: Timing) -> float:
    """a's time over b's, both figures of one run (of their medians, as RATIOS_OF says)."""
    return a.median / b.median


Key = TypeVar("Key", bound=Hashable)


def alternate(
    paths: Mapping[Key, Callable[[], Any]],
    device: torch.device,
    rounds: int = ROUNDS,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
) -> dict[Key, Timing]:
    """Each path's seconds over `rounds` rounds; within a round every path runs once, in the given order, so
    the calls go A B A B ... Each path first runs `warmup` untimed times, interleaved the same way.
    `before` (e.g. a barrier between ranks) runs untimed before every timed call."""
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    sync(device)
    seconds: dict[Key, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(s) for name, s in seconds.items()}


# ------------------------------------------------------------------------------------------ the machine


def oversubscription(threads: int, processes: int = 1) -> list[str]:
    """Why the machine is oversubscribed (empty when it is not): the 1-minute load average above the CPU
    count, or threads × concurrent processes of this bench above it."""
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    why = []
    if load > cpus:
        why.append(f"load average {load:.2f} > {cpus} CPUs")
    if threads * processes > cpus:
        why.append(f"{processes} process(es) × {threads} thread(s) = {threads * processes} > {cpus} CPUs")
    return why


def machine_line(threads: int, processes: int = 1) -> str:
    load = os.getloadavg()
    per = f"{threads} torch thread(s)" + (f" in each of {processes} processes" if processes > 1 else "")
    return f"machine: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; {per}"


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {n}")
    return n


def add_arguments(
    p: argparse.ArgumentParser, *, threads_default: int = 0, rounds: bool = True, threads_help: str = "torch threads"
) -> None:
    """--threads, and (for benches that time paths against each other) --rounds with --repeat as its old name."""
    if rounds:
        p.add_argument(
            "--rounds",
            "--repeat",
            dest="rounds",
            type=_at_least_one,
            default=ROUNDS,
            help=f"timed rounds, the compared paths alternating in each (default {ROUNDS}); min and median over them",
        )
    keep = "0 = torch's default" if threads_default == 0 else f"default {threads_default}"
    p.add_argument("--threads", type=int, default=threads_default, help=f"{threads_help} ({keep})")


@contextmanager
def session(threads: int, processes: int = 1, prog: str = "unroll bench", timed: bool = True) -> Iterator[None]:
    """Sets torch's thread count (`threads`; 0 keeps it), prints the machine line, warns on stderr when the
    machine is oversubscribed, and restores the thread count on exit (benches also run in-process).
    `timed`: the bench reports minima and medians of timed rounds (the warning then says to compare minima)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        now = torch.get_num_threads()
        print(machine_line(now, processes), flush=True)
        if why := oversubscription(now, processes):
            advice = ["compare minima"] if timed else []
            advice += ["use --threads 1"] if now > 1 else []
            print(
                f"{prog}: warning: the machine is oversubscribed ({'; '.join(why)}): timings are noisy and slow; "
                f"{', '.join(advice + ['or run when the machine is idle'])}",
                file=sys.stderr,
                flush=True,
            )
        yield
    finally:
        torch.set_num_threads(before)
