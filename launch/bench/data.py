"""`unroll bench data`: the data path at pretraining scale in one run, each figure against the floor it is held to.

    prepare     `unroll bench prepare --mb MB --workers 1,2` (with --megatron DIR, Megatron-LM's
                tools/preprocess_data.py beside it): prepare's tokens/s at each worker count against N times the
                tokenizer's one-thread encode of the same text (the per-worker floor), and against Megatron's at
                equal workers. MB is 100 by default: at 10 MB a run is about a second, and the workers' start and
                the last batch (one worker finishing alone) are a tenth of it
    memory      `unroll bench prepare --workers W --no-encode` at --rss-base-mb (10) and --rss-mb (1000): prepare's
                peak resident memory (main process and largest worker) at the large corpus over the same at the
                small one; memory that does not grow with the corpus keeps this near 1
    loader      `unroll bench loader`: TokenLoader.get and get_with_starts against raw memmap reads of as many
                windows, at each sequence length and blend size; and the time a step waits for its batch with
                and without prefetching

The two benches print their own tables first; then a summary: every ratio, its target and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from unroll.launch.bench import loader as loader_bench
from unroll.launch.bench import prepare as prepare_bench

# The targets: at least (">=") or at most ("<=") this ratio.
PER_WORKER, MEGATRON, RSS_GROWTH, LOADER, PREFETCH_WAIT = (
    (">=", 0.8),
    (">=", 1.0),
    ("<=", 1.2),
    (">=", 0.5),
    ("<=", 0.05),
)


def summary(prepare: dict, small: dict, large: dict, loader: dict, rss_workers: int) -> list[dict[str, Any]]:
    """{what, ratio, target, met} rows from the three benches' JSON figures."""
    rows: list[dict[str, Any]] = []

    def row(what: str, ratio: float, target: tuple[str, float]) -> None:
        bound, value = target
        rows.append(
            {"what": what, "ratio": ratio, "target": f"{bound} {value:g}", "met": (ratio >= value) == (bound == ">=")}
        )

    prep = prepare["rows"]
    encode_t1 = prep["encode t1"]["median_tokens_per_s"]
    for path in [p for p in prep if p.startswith("prepare w")]:
        n = int(path.split("w")[-1])
        row(
            f"{path} over {n} x encode t1 (per worker)", prep[path]["median_tokens_per_s"] / (n * encode_t1), PER_WORKER
        )
        if (megatron := path.replace("prepare", "megatron")) in prep:
            ratio = prep[path]["median_tokens_per_s"] / prep[megatron]["median_tokens_per_s"]
            row(f"{path} over {megatron}", ratio, MEGATRON)
    base, big = small["rows"][f"prepare w{rss_workers}"], large["rows"][f"prepare w{rss_workers}"]
    for key, name in (("rss_main_mb", "main process"), ("rss_worker_mb", "largest worker")):
        what = f"prepare w{rss_workers} peak RSS, {name}: {large['corpus_mb']:g} MB over {small['corpus_mb']:g} MB"
        row(what, big[key] / base[key], RSS_GROWTH)
    for figures in loader["get"]:
        for path, name in (("feistel", "get"), ("feistel+starts", "get_with_starts")):
            what = f"loader {name} over memmap, seq_len {figures['seq_len']}, {figures['datasets']} dataset(s)"
            row(what, figures[path] / figures["memmap"], LOADER)
    for figures in loader["prefetch"]:
        step = figures["compute_ms"]
        what = (
            f"a {step:g} ms step's wait for its batch with prefetch 2, share of the step, seq_len "
            f"{figures['seq_len']} (without prefetch: {figures['prefetch0_wait_ms'] / step:.3f})"
        )
        row(what, figures["prefetch2_wait_ms"] / step, PREFETCH_WAIT)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=100.0, help="the prepare corpus, MB of JSON lines (default 100)")
    p.add_argument("--rss-base-mb", type=float, default=10.0, help="the small corpus of the memory figure (default 10)")
    p.add_argument("--rss-mb", type=float, default=1000.0, help="the large corpus of the memory figure (default 1000)")
    p.add_argument("--rss-workers", type=int, default=2, help="prepare's workers for the memory figure (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="prepare's timed rounds (default 2); the loader's are 5")
    p.add_argument("--megatron", default=None, help="a Megatron-LM checkout: also time its tools/preprocess_data.py")
    p.add_argument("--tokenizer", default=None, help="prepare's tokenizer (as `unroll bench prepare`)")
    p.add_argument("--work", default=None, help="where corpora and outputs go (default: a temporary directory)")
    p.add_argument("--shard", default="runs/data/shakespeare/train", help="the loader's shard (`make run` writes it)")
    p.add_argument("--loader-args", default="", help="more arguments for `unroll bench loader`, space-separated")
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unroll-bench-data-") as tmp:
        work = Path(args.work or tmp)
        common = ["--work", str(work), *(["--tokenizer", args.tokenizer] if args.tokenizer else [])]
        figures: dict[str, Any] = {}
        for name, bench, bench_args in (
            ("prepare", prepare_bench, ["--mb", f"{args.mb:g}", "--workers", f"1,{args.rss_workers}"]),
            (
                "memory-base",
                prepare_bench,
                ["--mb", f"{args.rss_base_mb:g}", "--workers", str(args.rss_workers), "--no-encode"],
            ),
            ("memory", prepare_bench, ["--mb", f"{args.rss_mb:g}", "--workers", str(args.rss_workers), "--no-encode"]),
            ("loader", loader_bench, ["--shard", args.shard, *args.loader_args.split()]),
        ):
            print(f"\n== {name}", flush=True)
            out = work / f"{name}.json"
            if bench is prepare_bench:
                bench_args += [*common, "--rounds", str(args.rounds if name == "prepare" else 1)]
                bench_args += ["--megatron", args.megatron] if args.megatron and name == "prepare" else []
            if bench.main([*bench_args, "--json", str(out)]) != 0:
                print(f"bench data: the {name} bench failed", file=sys.stderr)
                return 1
            figures[name] = json.loads(out.read_text())
    rows = summary(figures["prepare"], figures["memory-base"], figures["memory"], figures["loader"], args.rss_workers)
    print("\n== summary: each ratio against its target")
    for r in rows:
        print(f"{r['ratio']:8.3f}  {r['target']:<7} {'met   ' if r['met'] else 'MISSED'} {r['what']}")
    if args.json:
        figures["summary"] = rows
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0
