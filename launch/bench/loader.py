"""`unroll bench loader`: the training loader's reads in the Feistel order against numpy's permutation, the cost
of the Feistel map per index, and what prefetching takes off a step.

    get            TokenLoader.get of --batches consecutive batches of --batch samples of --shard (by default
                   one blending block, 4096 samples, per round; each round reads the samples after the last
                   round's), per --seq-lens and per --datasets (the shard blended with itself that many times, as
                   a prepared directory's shards are), in each order; get_with_starts (tokens and document starts,
                   what a run with data.documents=isolated reads) in the Feistel order; raw reads of as many windows
                   from a memmap of the .bin at random sample starts (the floor); the paths alternating round by
                   round: samples/s of the median round
    feistel map    FeistelPermutation(--map-samples) of --map-indices positions: ns per index (the default size is
                   the 4.9e8 samples of 2T tokens at seq_len 4096)
    numpy table    np.random.default_rng(...).permutation(--table-samples): ns per sample drawn, and the bytes and
                   seconds an epoch table of --map-samples takes at that rate (scaled, not drawn: it is the
                   memory the Feistel order saves)
    prefetch       a stand-in training loop of --batches steps, each a read and then --compute-ms of waiting for
                   the device (a sleep, which holds no GIL, as a GPU step's host does): the time a step waits for
                   its batch with data.prefetch 0 and 2, the median round's, per step
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from unroll.launch.bench import harness

SAMPLES_2T_4096 = 2 * 10**12 // 4096


def get_rates(shard: str, seq_len: int, datasets: int, batch: int, batches: int, rounds: int) -> dict[str, float]:
    """samples/s (median round) of TokenLoader.get per order, of get_with_starts (what a run with isolated documents
    reads) in the Feistel order, and of raw memmap reads; the paths alternating. Every round reads samples no
    earlier round read, so a loader's per-block work is paid as often as in training, not once."""
    import torch

    from unroll.data.loader import ORDERS, PackedDataset, TokenLoader

    dataset = PackedDataset(shard, seq_len)
    first = 3 * dataset.n_samples * datasets  # a later epoch than the first
    loaders = {order: TokenLoader([dataset] * datasets, [1.0] * datasets, seed=0, order=order) for order in ORDERS}

    def reads(get: Callable[[int, int], Any]) -> Callable[[], None]:
        start = first

        def read() -> None:
            nonlocal start
            for b in range(batches):
                get(start + b * batch, batch)
            start += batches * batch

        return read

    # the floor: the same number of windows copied straight out of a memmap of the .bin, at random sample starts
    raw = np.memmap(dataset.shard.prefix + ".bin", dtype=dataset.shard.dtype, mode="r")
    picks = np.random.default_rng(0).integers(0, dataset.n_samples, batches * batch) * seq_len

    def memmap_reads() -> None:
        for b in range(batches):
            rows = [raw[i : i + seq_len + 1] for i in picks[b * batch : (b + 1) * batch]]
            torch.from_numpy(np.stack(rows).astype(np.int64))

    paths = {o: reads(lo.get) for o, lo in loaders.items()}
    paths |= {"feistel+starts": reads(loaders["feistel"].get_with_starts), "memmap": memmap_reads}
    times = harness.alternate(paths, torch.device("cpu"), rounds)
    return {path: batches * batch / t.median for path, t in times.items()}


def map_costs(map_samples: int, map_indices: int, table_samples: int, rounds: int) -> dict[str, float]:
    import torch

    from unroll.data.permutation import FeistelPermutation

    perm, positions = FeistelPermutation(map_samples, (0, 0, 0)), np.arange(map_indices)
    times = harness.alternate(
        {
            "feistel": lambda: perm(positions),
            "table": lambda: np.random.default_rng([0, 0, 0]).permutation(table_samples),
        },
        torch.device("cpu"),
        rounds,
    )
    table_ns = times["table"].median / table_samples * 1e9
    return {
        "feistel_ns_per_index": times["feistel"].median / map_indices * 1e9,
        "table_ns_per_sample": table_ns,
        "table_bytes_at_map_samples": 8.0 * map_samples,
        "table_seconds_at_map_samples": table_ns * map_samples / 1e9,
    }


def prefetch_waits(shard: str, seq_len: int, batch: int, batches: int, compute_s: float, rounds: int) -> dict:
    """Seconds per step spent waiting for the batch, data.prefetch 0 and 2 (median round)."""
    from unroll.data.loader import PackedDataset, TokenLoader
    from unroll.data.prefetch import Prefetcher

    loader = TokenLoader([PackedDataset(shard, seq_len)], [1.0], seed=0)
    waits: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(rounds):
        for depth in waits:
            plan = [(s * batch, batch) for s in range(batches)]
            waited = 0.0
            with Prefetcher(loader.get, iter(plan), depth) as reader:
                for request in plan:
                    t0 = time.perf_counter()
                    reader(*request)
                    waited += time.perf_counter() - t0
                    time.sleep(compute_s)
            waits[depth].append(waited / batches)
    return {f"prefetch{d}_wait_ms": float(np.median(w)) * 1e3 for d, w in waits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench loader", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shard", default="runs/data/shakespeare/train", help="a token shard prefix (`make run` writes it)")
    p.add_argument("--seq-lens", default="128,1024")
    p.add_argument("--datasets", default="1,100", help="blends of the shard with itself, comma-separated counts")
    p.add_argument("--batch", type=int, default=64, help="samples per get")
    p.add_argument("--batches", type=int, default=64, help="gets (steps) per round")
    p.add_argument("--map-samples", type=int, default=SAMPLES_2T_4096)
    p.add_argument("--map-indices", type=int, default=10**6)
    p.add_argument("--table-samples", type=int, default=10**7)
    p.add_argument("--compute-ms", type=float, default=5.0, help="the stand-in step's device time")
    harness.add_arguments(p, threads_default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    out: dict[str, Any] = {"get": [], "prefetch": []}
    with harness.session(args.threads, prog="unroll bench loader"):
        print(
            f"{args.shard}; {args.rounds} rounds, the compared paths alternating; figures of the median round "
            f"(ratios of the {harness.RATIOS_OF})"
        )
        print(
            f"TokenLoader.get of {args.batch} samples: samples/s in each order, and raw memmap reads of as many "
            "windows (the floor); get_with_starts in the Feistel order (+starts); feistel over numpy, feistel and "
            "+starts over memmap"
        )
        print(
            f"{'seq_len':>7} {'datasets':>8} {'feistel':>10} {'numpy':>10} {'+starts':>10} {'memmap':>10} "
            f"{'f/n':>6} {'f/mm':>6} {'+s/mm':>6}"
        )
        for seq_len in seq_lens:
            for datasets in [int(d) for d in args.datasets.split(",")]:
                rates = get_rates(args.shard, seq_len, datasets, args.batch, args.batches, args.rounds)
                feistel, numpy, memmap = rates["feistel"], rates["numpy-permutation"], rates["memmap"]
                starts = rates["feistel+starts"]
                print(
                    f"{seq_len:7d} {datasets:8d} {feistel:10,.0f} {numpy:10,.0f} {starts:10,.0f} {memmap:10,.0f} "
                    f"{feistel / numpy:6.2f} {feistel / memmap:6.2f} {starts / memmap:6.2f}"
                )
                out["get"].append({"seq_len": seq_len, "datasets": datasets, "batch": args.batch, **rates})
        costs = map_costs(args.map_samples, args.map_indices, args.table_samples, args.rounds)
        out["map"] = costs
        print(
            f"feistel map over {args.map_samples:,} samples: {costs['feistel_ns_per_index']:.0f} ns per index "
            f"({args.map_indices:,} indices); numpy table: {costs['table_ns_per_sample']:.1f} ns per sample drawn "
            f"({args.table_samples:,}), so an epoch table of {args.map_samples:,} samples would hold "
            f"{costs['table_bytes_at_map_samples'] / 2**30:.1f} GiB and take {costs['table_seconds_at_map_samples']:.1f}"
            " s to draw"
        )
        for seq_len in seq_lens:
            waits = prefetch_waits(args.shard, seq_len, args.batch, args.batches, args.compute_ms / 1e3, args.rounds)
            out["prefetch"].append({"seq_len": seq_len, "compute_ms": args.compute_ms, **waits})
            print(
                f"seq_len {seq_len}: a step of {args.compute_ms:g} ms waits {waits['prefetch0_wait_ms']:.3f} ms for "
                f"its batch of {args.batch} without prefetch, {waits['prefetch2_wait_ms']:.3f} ms with data.prefetch=2"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
