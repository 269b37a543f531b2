"""`unroll bench zero-offload`: memory per rank of DeepSpeed ZeRO-3 with CPU optimizer offload (and, as a third
path, parameters offloaded too) against FSDP2, both on 2 ranks, on the same ~110M-parameter model (tiny-gru
widened: 12 ParaGRU layers, d_model 768, a 32000-token vocabulary, tied embeddings), in one run.

Each path is its own 2-rank launch (torch.distributed.run of this module's worker; gloo on CPU, nccl with one GPU
per rank on CUDA), so that one path's peak is not another's: the trainer's own build (train/build.py, the
DeepSpeed engine through train/deepspeed_engine.py) and `--steps` training steps (train/step.py) on synthetic
tokens. Per rank it measures:

  device state    bytes of the training state the engine keeps on the training device, from the tensors
                  themselves just before AdamW's last step (when parameters, gradients and AdamW's moments
                  all exist): FSDP2's parameter, gradient and moment shards; ZeRO-3's parameter partitions
                  (not with its parameters offloaded), and its fp32 master partitions, their gradients and
                  AdamW's moments unless the optimizer is offloaded
  offloaded       what ZeRO's offload holds in CPU memory instead (the same tensors, on the other side)
  peak RSS        the rank process's peak resident memory (VmHWM): everything, CPU side, Python and torch
                  included. On a CPU-only machine the "device" is the CPU itself: offloading moves nothing out
                  of this memory, and ZeRO's extra copies (the fp32 master copy, its buffers) show here
  CUDA peak       on --device cuda: torch.cuda.max_memory_allocated, the GPU's own peak (the figure that
                  offloading lowers)

Ratios are ZeRO's figure over FSDP2's (below 1: ZeRO holds less). Not measured: speed (offload trades it for
memory; `unroll bench throughput` measures tokens/s).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from unroll.launch.bench import harness
from unroll.launch.torchrun import finish_rank, rank_results, run_torchrun
from unroll.train.planning.memory import optimizer_bytes, storage_bytes

RANKS = 2
MODEL = ["model.pattern=GGGGGGGGGGGG", "model.d_model=768", "model.vocab_size=32000"]  # ~110M parameters
QUICK = ["model.pattern=GG", "model.d_model=64", "model.vocab_size=512"]  # the plumbing, for tests
ZERO3 = ["parallel.engine=deepspeed", "deepspeed.zero_stage=3"]
PATHS = {
    "FSDP2": ["parallel.engine=torch"],
    "ZeRO-3 + CPU optimizer offload": ZERO3 + ["deepspeed.offload_optimizer=cpu"],
    "ZeRO-3 + CPU optimizer and parameter offload": ZERO3
    + ["deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"],
}
BASELINE = "FSDP2"


def inventory(t, cfg) -> dict[str, int]:
    """(device, offloaded) bytes of this rank's training state (module docstring)."""
    params = list(t.model.parameters())
    if t.engine is None:  # FSDP2: every shard on the training device
        device = storage_bytes(params) + storage_bytes([p.grad for p in params]) + optimizer_bytes(t.optimizer)
        return {"device_state": device, "offloaded": 0}
    run = t.engine
    flat = run._flat_partitions()
    optimizer_side = storage_bytes(flat) + storage_bytes([f.grad for f in flat]) + optimizer_bytes(run.zero.optimizer)
    param_side = storage_bytes([getattr(p, "ds_tensor", p) for p in params]) + storage_bytes([p.grad for p in params])
    sides = {"device_state": 0, "offloaded": 0}
    sides["offloaded" if cfg.deepspeed.offload_optimizer != "none" else "device_state"] += optimizer_side
    sides["offloaded" if cfg.deepspeed.offload_params != "none" else "device_state"] += param_side
    return sides


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec_path: str) -> int:
    """One rank of one path: the trainer's build and steps, then OUT/rank{r}.json with its figures."""
    from unroll.train.build import build_training
    from unroll.train.config import load_config
    from unroll.train.parallel import distributed as D
    from unroll.train.preflight import check_layout
    from unroll.train.step import train_step

    spec = json.loads(Path(spec_path).read_text())
    faulthandler.dump_traceback_later(max(30, spec["timeout"] - 10), exit=True)
    torch.set_num_threads(spec["threads"])
    cfg = load_config("tiny-gru", spec["overrides"])
    dist = D.init(spec["device"], 600)
    try:
        shape = check_layout(cfg, dist.world)
        t = build_training(cfg, dist, shape.layout, shape.micro, shape.accum)
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        inner = t.engine.zero.optimizer if t.engine is not None else t.optimizer
        seen: dict = {}
        real_step = inner.step

        def step(*args, **kwargs):  # ZeRO-3 steps AdamW once per sub-group: the first call sees the whole state
            if seen.get("last") and "device_state" not in seen:
                seen.update(inventory(t, cfg))
            return real_step(*args, **kwargs)

        inner.step = step  # type: ignore[method-assign]  # on this instance only
        vocab, seq = cfg.model.vocab_size, cfg.data.seq_len

        def batches(start: int, n: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(start)
            return torch.randint(0, vocab, (n, seq + 1), generator=g)

        losses = []
        for s in range(spec["steps"]):
            seen["last"] = s == spec["steps"] - 1
            first = s * cfg.train.batch_size + dist.rank * shape.micro * shape.accum
            result = train_step(t, cfg, batches, first, cfg.optim.lr, dist.device, None)
            losses.append(float(result.loss_sum))
        result_row = {
            "device_state": seen["device_state"],
            "offloaded": seen["offloaded"],
            "peak_rss": _peak_rss(),
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in t.model.parameters()),
            "losses": losses,
        }
        if dist.device.type == "cuda":
            result_row["cuda_peak"] = torch.cuda.max_memory_allocated(dist.device)
        out: dict = result_row
    except Exception:
        out = {"error": traceback.format_exc()}
    finish_rank(spec["out"], dist.rank, out)


def run_path(name: str, overrides: list[str], args, timeout: float) -> list[dict]:
    """One path on RANKS ranks: each rank's figures, in rank order."""
    with tempfile.TemporaryDirectory(prefix="unroll-zero-offload-") as tmp:
        spec = {
            "overrides": overrides,
            "steps": args.steps,
            "threads": args.threads,
            "device": args.device,
            "out": tmp,
            "timeout": timeout,
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        if args.device == "cpu":  # DeepSpeed's CPU accelerator also where a GPU is present
            env["DS_ACCELERATOR"] = "cpu"
        proc = run_torchrun(["-m", "unroll.launch.bench.zero_offload", "--worker", str(spec_path)], RANKS, env, timeout)
        return rank_results(Path(tmp), RANKS, proc)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def format_table(rows: dict[str, list[dict]], cuda: bool) -> str:
    """One line per path (the larger rank's figure per column) and its ratios to FSDP2's."""
    cols = ["device_state", "offloaded", "peak_rss"] + (["cuda_peak"] if cuda else [])
    heads = {"device_state": "device state MiB", "offloaded": "offloaded MiB", "peak_rss": "peak RSS MiB"}
    heads["cuda_peak"] = "CUDA peak MiB"
    width = max(len(f"ratio {n} / {BASELINE}") for n in rows) + 2
    lines = [f"{'path (2 ranks; per rank, the larger)':<{width}}" + "".join(f"{heads[c]:>18}" for c in cols)]
    worst = {name: {c: max(r[c] for r in ranks) for c in cols} for name, ranks in rows.items()}
    for name, fig in worst.items():
        lines.append(f"{name:<{width}}" + "".join(f"{_mib(fig[c]):>18}" for c in cols))
    base = worst[BASELINE]
    for name, fig in worst.items():
        if name == BASELINE:
            continue
        ratios = "".join(
            f"{(fig[c] / base[c] if base[c] else float('nan')):>17.3f}x" if c != "offloaded" else f"{'':>18}"
            for c in cols
        )
        lines.append(f"{'ratio ' + name + ' / ' + BASELINE:<{width}}" + ratios)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    p = argparse.ArgumentParser(
        prog="unroll bench zero-offload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: nccl, one GPU per rank")
    p.add_argument("--steps", type=int, default=2, help="training steps per path (>= 2: AdamW's state exists)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank and step")
    p.add_argument("--quick", action="store_true", help="a 2-layer d_model 64 model: the plumbing only")
    harness.add_arguments(p, threads_default=1, rounds=False, threads_help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per path's 2-rank launch")
    p.add_argument("--json", default=None, help="also write every rank's figures here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps: at least 2 (the last step's AdamW finds its state)")
    if args.device == "cuda" and torch.cuda.device_count() < RANKS:
        print(f"unroll bench zero-offload: --device cuda needs {RANKS} GPUs", file=sys.stderr)
        return 2
    base = (QUICK if args.quick else MODEL) + [
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.micro_batch * RANKS}",
        "train.activation_checkpoint=none",
        f"run.device={args.device}",
        f"run.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
    ]
    rows: dict[str, list[dict]] = {}
    with harness.session(args.threads, RANKS, prog="unroll bench zero-offload", timed=False):
        for name, keys in PATHS.items():
            rows[name] = run_path(name, base + keys, args, args.timeout)
    params = rows[BASELINE][0]["params"]
    print(
        f"model: tiny-gru {' '.join(QUICK if args.quick else MODEL)} ({params / 1e6:.1f}M parameters), "
        f"{args.steps} steps of {args.micro_batch} × {args.seq_len} tokens per rank, {args.device}"
    )
    print(format_table(rows, args.device == "cuda"))
    if args.device == "cpu":
        print(
            "on a CPU the training device is host memory: `device state` is what stays on it, `offloaded` what ZeRO "
            "moves to the CPU side, and peak RSS counts both (see --help)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
