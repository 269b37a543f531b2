"""`unroll bench tnt`: training throughput of one TNT memory layer against plain chunkwise Titans, side by
side in one run, as ratios to Titans at the smallest chunk.

Every row is the same mixer (models/tnt.py: 2-layer MLP memories, momentum and forgetting) on the same
random input; only the memory layout differs:

    titans C      one memory, chunk C, never reset: T / C sequential chunk steps
    tnt           a global memory on chunks of C_G plus a local memory on chunks of C_L reset every S_L
                  tokens: the shards of every sequence run as one batch, so T / C_G + S_L / C_L steps

The timed step is forward + backward. All layouts are built first, then they alternate step by step, one
step each per round, after one warm-up step each; printed are the step time's minimum and median over
--rounds, tokens/s = batch · T / median, and the ratio of tokens/s to the first layout's (of the medians).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from unroll.launch.bench import harness
from unroll.models.tnt import TNT


def layouts(titans: list[int], global_chunk: int, local_chunk: int, reset: int) -> list[tuple[str, dict]]:
    rows = [(f"titans C={c}", dict(global_chunk=0, local_chunks=(c,), local_reset=0, qk_project=False)) for c in titans]
    rows.append(
        (
            f"tnt C_G={global_chunk} C_L={local_chunk} S_L={reset}",
            dict(global_chunk=global_chunk, local_chunks=(local_chunk,), local_reset=reset, qk_project=True),
        )
    )
    return rows


def sequential_steps(m: TNT, T: int) -> int:
    """Chunk steps that must run one after another in a forward of T tokens."""
    return sum(-(-min(T, s.reset or T) // s.chunk) for s in m.specs)


def run(
    rows: list[tuple[str, dict]],
    *,
    batch: int,
    seq_len: int,
    d_model: int,
    heads: int,
    rounds: int,
    device: torch.device,
) -> list[dict]:
    out: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], None]] = {}
    for i, (name, layout) in enumerate(rows):
        torch.manual_seed(0)
        m = TNT(d_model, heads=heads, **layout).to(device)
        x = torch.randn(batch, seq_len, d_model, device=device)

        def step(m=m, x=x):
            y, _ = m(x)
            y.square().mean().backward()
            m.zero_grad(set_to_none=True)

        steps[i] = step
        out.append(
            {"layout": name, "sequential_steps": sequential_steps(m, seq_len), "batch": batch, "seq_len": seq_len}
        )
    times = harness.alternate(steps, device, rounds)
    for i, r in enumerate(out):
        r.update(
            step_ms=times[i].median * 1e3,
            step_min_ms=times[i].min * 1e3,
            tokens_per_s=batch * seq_len / times[i].median,
        )
    base = out[0]["tokens_per_s"]
    for r in out:
        r["vs_baseline"] = r["tokens_per_s"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench tnt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--titans-chunks", default="8,64", help="comma-separated Titans chunk sizes; the first is the baseline"
    )
    p.add_argument("--global-chunk", type=int, default=64)
    p.add_argument("--local-chunk", type=int, default=8)
    p.add_argument("--reset", type=int, default=64, help="S_L: local memory reset period")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    harness.add_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.reset % args.local_chunk:
        p.error(f"--local-chunk {args.local_chunk} must divide --reset {args.reset}")
    with harness.session(args.threads, prog="unroll bench tnt"):
        rows = run(
            layouts([int(c) for c in args.titans_chunks.split(",")], args.global_chunk, args.local_chunk, args.reset),
            batch=args.batch,
            seq_len=args.seq_len,
            d_model=args.d_model,
            heads=args.heads,
            rounds=args.rounds,
            device=torch.device(args.device),
        )
    print(
        f"one TNT layer, forward + backward, batch {args.batch} × {args.seq_len} tokens, d_model {args.d_model}, "
        f"{args.heads} heads, {args.device}, {args.rounds} rounds, the layouts alternating; tokens/s of the median "
        f"step; ratio = tokens/s over {rows[0]['layout']} (of the {harness.RATIOS_OF})"
    )
    print(f"{'layout':34} {'seq steps':>9} {'step ms min/med':>17} {'tokens/s':>10} {'ratio':>6}")
    for r in rows:
        step = f"{r['step_min_ms']:.1f}/{r['step_ms']:.1f}"
        print(
            f"{r['layout']:34} {r['sequential_steps']:9d} {step:>17} {r['tokens_per_s']:10,.0f} {r['vs_baseline']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
