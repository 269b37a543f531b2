"""Bytes one rank sends per collective, and a per-step tally of them.

The model (bandwidth-optimal ring / chain algorithms, n = ranks in the group, sizes in bytes):

    kind            bytes this rank sends                       the size it is computed from
    all_gather      (n-1)/n · output   (= (n-1) · input)        the gathered output
    reduce_scatter  (n-1)/n · input    (= (n-1) · output)       the full input
    all_reduce      2(n-1)/n · tensor  (reduce-scatter + all-gather)
    all_to_all      input − the chunk it keeps for itself       exact, from the split sizes
    broadcast       (n-1)/n · tensor   a chain: every rank but the last forwards the tensor once;
    reduce          (n-1)/n · tensor     this is the average over the group's ranks
    gather          input on a non-root rank, 0 on the root
    scatter         (n-1) · chunk on the root, 0 elsewhere
    send            the tensor;  recv: 0 (counted as a call)
    barrier         0 (counted as a call)

Latency terms, in-network reduction (NVLS/SHARP) and tree algorithms are outside the model: it is the
traffic a ring implementation puts on this rank's links, which is what NCCL's bus bandwidth measures.

    log = TrafficLog()
    log.add("all_gather", group_size=8, group="mesh_dp_shard", sent=all_gather_bytes(8, out_bytes))
    log.snapshot()                 {CommKey(kind, group_size, group): Traffic(calls, bytes)}
    log.total(kind=..., group_size=...)   summed bytes; log.reset() starts the next step
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

KINDS = (
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "barrier",
)


def all_gather_bytes(n: int, output_bytes: int) -> int:
    return (n - 1) * output_bytes // n


def reduce_scatter_bytes(n: int, input_bytes: int) -> int:
    return (n - 1) * input_bytes // n


def all_reduce_bytes(n: int, tensor_bytes: int) -> int:
    return 2 * (n - 1) * tensor_bytes // n


def chain_bytes(n: int, tensor_bytes: int) -> int:
    """broadcast and reduce: the average over ranks of a chain where all but one rank send once."""
    return (n - 1) * tensor_bytes // n


def all_to_all_bytes(input_bytes: int, own_chunk_bytes: int) -> int:
    return input_bytes - own_chunk_bytes


class CommKey(NamedTuple):
    kind: str  # one of KINDS
    group_size: int
    group: str  # the process group's description ("default_pg", DeviceMesh's "mesh_<dim>", ...)


@dataclass
class Traffic:
    calls: int = 0
    bytes: int = 0  # sent by this rank


class TrafficLog:
    """Calls and bytes sent, per (kind, group size, group)."""

    def __init__(self) -> None:
        self._t: dict[CommKey, Traffic] = {}

    def add(self, kind: str, group_size: int, group: str, sent: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown collective kind {kind!r}")
        t = self._t.setdefault(CommKey(kind, group_size, group), Traffic())
        t.calls += 1
        t.bytes += sent

    def reset(self) -> None:
        self._t.clear()

    def snapshot(self) -> dict[CommKey, Traffic]:
        return {k: Traffic(v.calls, v.bytes) for k, v in self._t.items()}

    def total(self, kind: str | None = None, group_size: int | None = None) -> int:
        return sum(
            t.bytes
            for k, t in self._t.items()
            if (kind is None or k.kind == kind) and (group_size is None or k.group_size == group_size)
        )

    def calls(self, kind: str | None = None, group_size: int | None = None) -> int:
        return sum(
            t.calls
            for k, t in self._t.items()
            if (kind is None or k.kind == kind) and (group_size is None or k.group_size == group_size)
        )

    def table(self) -> str:
        """One line per (kind, group size, group), largest traffic first."""
        rows = sorted(self._t.items(), key=lambda kv: -kv[1].bytes)
        lines = [f"{'kind':<15}{'ranks':>6}  {'group':<20}{'calls':>8}{'bytes sent':>16}"]
        lines += [f"{k.kind:<15}{k.group_size:>6}  {k.group:<20}{t.calls:>8}{t.bytes:>16,}" for k, t in rows]
        return "\n".join(lines)
