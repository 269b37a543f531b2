"""`unroll bench checkpoint`: unroll's checkpoints against the disk's own speed, side by side in one run.

Builds a model (a preset with key=value overrides; by default tiny-gru widened to d_model 1024 and 8
layers, about 1.2 GB of weights and AdamW state, the optimizer state filled with random numbers) and, in a
directory on the disk under test (--dir), times in turn, round after round:

    save    checkpoint.save: DCP shards written by checkpoint.io_threads threads with every item checksummed,
            checksums.json, RNG and train state, the manifest, the rename (the checkpoint's bytes / time)
    dd      `dd if=/dev/zero of=FILE bs=1M count=N conv=fdatasync` with N MiB the checkpoint's size
    load    checkpoint.load into the model and optimizer, every item verified, from a cold page cache
    read    every file of the checkpoint read back in 16 MiB pieces by plain Python, from a cold page cache
    async   the trainer's async path (CheckpointWriter, checkpoint.async_save=true): how long `save` holds
            the training loop, and how long --steps training steps take while the write goes on, against the
            same steps with no save (the foreground cost of the background write)

A cold page cache: every file of the checkpoint is fsynced and then posix_fadvise(POSIX_FADV_DONTNEED)'d,
which evicts its clean pages without root (a file mapped by another process would stay cached; none is).

Alternation: a load needs the save before it, and the plain read needs its files, so the unit that
alternates is the round, not the single call: each round runs save and dd, then load and read, back to
back, and each pair swaps its order from round to round so that neither always follows the other's
writes or reads; the async save and the steps without it follow in the same round. One untimed round
comes first (the first save faults in fresh memory). Printed are the best (the minimum time) and the
median bandwidth of each over --rounds, and the ratios save/dd and load/read of the medians (targets:
>= 0.8 and >= 0.5). On a virtual disk the host's own caching shows through and dd alone can swing
several-fold between runs, so compare bests as well as medians, over several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unroll.launch.bench import harness
from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint.writer import CheckpointWriter
from unroll.train.config import load_config
from unroll.train.optim import build_optimizer

DEFAULT_MODEL = ["model.d_model=1024", "model.pattern=GGGGGGGG"]
TARGETS = {"save/dd": 0.8, "load/read": 0.5}


def drop_from_page_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as stream:
            while stream.readinto(buf):
                pass


def dd(path: Path, mib: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"], check=True, capture_output=True
    )
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def build(preset: str, overrides: list[str]):
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    checkpoint.save_view(model, optimizer)  # creates AdamW's state, as a resumed run has it
    for state in optimizer.state.values():  # random, not zeros: nothing a file system could compress away
        for value in state.values():
            if value.is_floating_point() and value.dim():
                value.copy_(torch.rand_like(value) * 1e-3)
    return cfg, model, optimizer


def training_steps(model: LM, optimizer, tokens: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(
    preset: str, overrides: list[str], *, root: Path, rounds: int, io_threads: int, steps: int, seq_len: int
) -> dict:
    cfg, model, optimizer = build(preset, overrides)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {
        k: []
        for k in ("save", "dd", "load", "read", "async_blocked", "async_written", "steps_alone", "steps_during_save")
    }
    size = files = 0
    path: Path | None = None
    # one writer for every round, as for a whole run: from the second save on, its staging buffers are reused
    writer = CheckpointWriter(root / "async", keep=1, rank=0, async_save=True, io_threads=io_threads)
    for round_ in range(rounds + 1):
        run_dir = root / f"round{round_}"
        measured: dict[str, float] = {}

        def save() -> None:
            nonlocal path, size, files
            start = time.perf_counter()
            path = checkpoint.save(run_dir, 1, model, optimizer, {"samples_consumed": 0}, keep=1, io_threads=io_threads)
            measured["save"] = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            files = sum(1 for f in path.iterdir() if f.is_file())

        def dd_same_bytes() -> None:  # whole MiB, its time scaled to the checkpoint's bytes
            assert size, "save() ran first"
            mib = max(1, size >> 20)
            measured["dd"] = dd(root / "dd.bin", mib) * size / (mib << 20)

        def load() -> None:
            assert path is not None, "save() ran first"
            drop_from_page_cache(sorted(f for f in path.iterdir() if f.is_file()))
            start = time.perf_counter()
            checkpoint.load(path, model, optimizer, io_threads=io_threads)
            measured["load"] = time.perf_counter() - start

        def read() -> None:
            assert path is not None, "save() ran first"
            ckpt_files = sorted(f for f in path.iterdir() if f.is_file())
            drop_from_page_cache(ckpt_files)
            start = time.perf_counter()
            read_files(ckpt_files)
            measured["read"] = time.perf_counter() - start

        # A B in one round, B A in the next
        for step in (dd_same_bytes, save, read, load) if round_ % 2 else (save, dd_same_bytes, load, read):
            step()
        save_s, dd_s, load_s, read_s = (measured[k] for k in ("save", "dd", "load", "read"))
        shutil.rmtree(run_dir)

        alone_s = training_steps(model, optimizer, tokens, steps)
        start = time.perf_counter()
        writer.save(round_ + 1, model, optimizer, {"samples_consumed": 0})
        blocked_s = time.perf_counter() - start
        during_s = training_steps(model, optimizer, tokens, steps)
        writer.wait()
        written_s = time.perf_counter() - start
        if round_:  # the first round warms up (and allocates the async save's buffers)
            for key, value in zip(times, (save_s, dd_s, load_s, read_s, blocked_s, written_s, alone_s, during_s)):
                times[key].append(value)
    writer.close(finish=True)

    timed = {key: harness.Timing(seconds) for key, seconds in times.items()}

    def bandwidth(key: str) -> dict:
        return {
            "best_gbps": size / timed[key].min / 1e9,
            "median_gbps": size / timed[key].median / 1e9,
            "seconds": times[key],
        }

    rows = {key: bandwidth(key) for key in ("save", "dd", "load", "read")}
    ratios = {
        "save/dd": harness.ratio(timed["dd"], timed["save"]),  # bandwidths: the inverse of the times' ratio
        "load/read": harness.ratio(timed["read"], timed["load"]),
    }
    async_ = {
        "blocked_s": times["async_blocked"],
        "written_s": times["async_written"],
        "steps": steps,
        "steps_alone_s": times["steps_alone"],
        "steps_during_save_s": times["steps_during_save"],
        "blocked_vs_save": harness.ratio(timed["async_blocked"], timed["save"]),
        "steps_slowdown": harness.ratio(timed["steps_during_save"], timed["steps_alone"]),
    }
    return {
        "preset": preset,
        "overrides": overrides,
        "params": model.num_params(),
        "bytes": size,
        "files": files,
        "io_threads": io_threads,
        "rounds": rounds,
        "dir": str(root),
        "rows": rows,
        "ratios": ratios,
        "targets": TARGETS,
        "async": async_,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("preset", nargs="?", default="tiny-gru", help="a preset or YAML config (default tiny-gru)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"model overrides (default with tiny-gru: {' '.join(DEFAULT_MODEL)})",
    )
    p.add_argument("--dir", default=None, help="a directory on the disk to test (default: the system's temp dir)")
    p.add_argument("--io-threads", type=int, default=4, help="checkpoint.io_threads")
    p.add_argument("--steps", type=int, default=2, help="training steps timed with and without an async save")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training step (batch 1)")
    harness.add_arguments(p)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.io_threads < 1:
        p.error("--steps and --io-threads must be >= 1")
    overrides = args.overrides or (DEFAULT_MODEL if args.preset == "tiny-gru" else [])
    with (
        harness.session(args.threads, prog="unroll bench checkpoint"),
        tempfile.TemporaryDirectory(prefix="unroll-bench-checkpoint-", dir=args.dir) as root,
    ):
        result = run(
            args.preset,
            overrides,
            root=Path(root),
            rounds=args.rounds,
            io_threads=args.io_threads,
            steps=args.steps,
            seq_len=args.seq_len,
        )
    print(
        f"checkpoint of {args.preset} {' '.join(overrides)}: {result['params']:,} parameters, "
        f"{result['bytes'] / 1e9:.3f} GB in {result['files']} files, io_threads {args.io_threads}, "
        f"{args.rounds} rounds alternating, in {result['dir']}"
    )
    print(f"{'':6} {'best GB/s':>10} {'median GB/s':>12}")
    for key, row in result["rows"].items():
        print(f"{key:6} {row['best_gbps']:10.3f} {row['median_gbps']:12.3f}")
    for key, ratio in result["ratios"].items():
        print(f"{key:9} {ratio:6.2f} (of the {harness.RATIOS_OF}; target >= {TARGETS[key]})")
    a = result["async"]
    print(
        f"async save: blocks the loop {harness.Timing(a['blocked_s']).median:.3f} s "
        f"({a['blocked_vs_save']:.2f} of a synchronous save), written in {harness.Timing(a['written_s']).median:.3f} s; "
        f"{a['steps']} training steps during it took {a['steps_slowdown']:.2f}x their time alone (medians)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
