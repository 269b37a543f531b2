"""`unroll bench throughput`: training tokens per second of model presets, side by side in one run, as
ratios to a baseline preset (by default the tiny presets of every family vs tiny-transformer on CPU).
With --documents L each preset also trains on rows packed with documents of mean length L (model.documents
isolated: the resets reach every mixer) beside the same rows as one stream each, and the table gives the
isolated/packed ratio of each preset.

Each preset's model trains (forward, backward and AdamW step, with MoE bias updates) on random tokens of
its own sequence length and a fixed batch. All models are built first; then the presets alternate step
by step, one step each per round, so that a load change on the machine falls on every preset alike.
Printed per preset: the step time's minimum and median over --rounds, tokens/s of the median, the model
TFLOP/s that makes (models/flops.py, with the Newton iterations the last step took) and, where the device's
peak is known (train/mfu.py, or --peak-tflops), the MFU, and the ratio of tokens/s to the baseline's. Random
tokens make the timing independent of the corpus; the work per step is the real one. --dtype bfloat16
runs the forward and the loss under bf16 autocast as the trainer does (run.dtype=bfloat16: float32 weights,
the recurrences in float32), and the MFU is then of the device's bf16 peak. Each model is built and
initialised on the device itself (a 1B model's initialisation takes minutes on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from unroll.launch.bench import harness
from unroll.models import LM
from unroll.models.flops import model_flops
from unroll.train.build import autocast_for
from unroll.train.config import load_config
from unroll.train.layer_metrics import solve_iterations
from unroll.train.mfu import peak_flops, utilisation
from unroll.train.step import update_expert_bias

TINY = ["tiny-transformer", "tiny-gru", "tiny-lstm", "tiny-m2rnn", "tiny-moe"]


def _step_fn(
    model: LM,
    tokens: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    resets: torch.Tensor | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
):
    autocast = autocast or contextlib.nullcontext()

    def step():
        with autocast:  # the forward and the loss, as train/step.py; the backward outside
            logits = model(tokens[:, :-1], resets=resets)
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model, tokens.device)

    return step


def document_starts(batch: int, T: int, mean_length: float, generator: torch.Generator) -> torch.Tensor:
    """resets [batch, T]: a document starts at each position with probability 1/mean_length."""
    return torch.rand(batch, T, generator=generator) < 1.0 / mean_length


def run(
    presets: list[str],
    batch: int,
    seq_len: int | None,
    rounds: int,
    device: torch.device,
    documents: float = 0,
    peak_tflops: float = 0.0,
    dtype: str = "float32",
) -> list[dict]:
    """dtype: run.dtype's float32 (no autocast) or bfloat16 (bf16 autocast)."""
    rows: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], None]] = {}
    models: dict[int, LM] = {}
    for name in presets:
        run_cfg = load_config(name, [f"run.dtype={dtype}"])
        cfg, autocast = run_cfg.model, autocast_for(run_cfg, device)
        T = seq_len or run_cfg.data.seq_len
        tokens = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(0))
        starts = document_starts(batch, T, documents, torch.Generator().manual_seed(1)) if documents else None
        for mode, resets in [("packed", None), ("isolated", starts)] if documents else [("", None)]:
            torch.manual_seed(0)
            with torch.device(device):
                model = models[len(rows)] = LM(cfg)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps[len(rows)] = _step_fn(
                model, tokens.to(device), optimizer, None if resets is None else resets.to(device), autocast
            )
            rows.append(
                {
                    "preset": name,
                    "documents": mode,
                    "pattern": cfg.pattern,
                    "params": model.num_params(),
                    "params_active": model.active_params(),
                    "batch": batch,
                    "seq_len": T,
                    "dtype": dtype,
                }
            )
    times = harness.alternate(steps, device, rounds)
    # the matmuls' precision: bf16 under autocast, else float32 (tf32 where torch allows it)
    peak = peak_flops(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32, peak_tflops)
    for i, r in enumerate(rows):
        t = times[i]
        r.update(step_ms=t.median * 1e3, step_min_ms=t.min * 1e3, tokens_per_s=batch * r["seq_len"] / t.median)
        flops = model_flops(models[i].cfg, r["seq_len"]).per_token(solve_iterations(models[i]))
        r.update(flops_per_token=flops, **utilisation(r["tokens_per_s"], flops, 1, peak))
    base = rows[0]["tokens_per_s"]
    packed = {r["preset"]: r["tokens_per_s"] for r in rows if r["documents"] == "packed"}
    for r in rows:
        r["vs_baseline"] = r["tokens_per_s"] / base
        if r["documents"] == "isolated":
            r["isolated_vs_packed"] = r["tokens_per_s"] / packed[r["preset"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", default=",".join(TINY), help="comma-separated; the first is the baseline")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: each preset's data.seq_len")
    harness.add_arguments(p)
    p.add_argument(
        "--documents",
        type=float,
        default=0,
        metavar="L",
        help="also train each preset on rows of isolated documents of mean length L beside packed rows",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="as run.dtype: float32 (no autocast, the default) or bfloat16 (bf16 autocast, as the trainer on a GPU)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's peak TFLOP/s for the MFU column; default: train/mfu.py's table (none for a CPU)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    with harness.session(args.threads, prog="unroll bench throughput"):
        rows = run(
            args.presets.split(","),
            args.batch,
            args.seq_len,
            args.rounds,
            torch.device(args.device),
            args.documents,
            args.peak_tflops,
            args.dtype,
        )
        print(
            f"training step (fwd+bwd+AdamW), batch {args.batch}, {args.device}, {args.dtype}"
            f"{' autocast' if args.dtype == 'bfloat16' else ''}, {args.rounds} rounds, the presets "
            f"alternating; tokens/s of the median step; ratio = tokens/s over {rows[0]['preset']}'s (of the "
            f"{harness.RATIOS_OF})"
        )
    docs = " isolated/packed" if args.documents else ""
    mfu = "mfu" in rows[0]  # a peak is known for the device (or given)
    mfu_header = f" {'MFU':>6}" if mfu else ""
    print(
        f"{'preset':18} {'documents':9} {'pattern':10} {'params':>11} {'active':>11} {'T':>5} "
        f"{'step ms min/med':>17} {'tokens/s':>10} {'TFLOP/s':>9}{mfu_header} {'ratio':>6}{docs}"
    )
    for r in rows:
        step = f"{r['step_min_ms']:.1f}/{r['step_ms']:.1f}"
        iso = f" {r['isolated_vs_packed']:15.2f}" if "isolated_vs_packed" in r else ""
        util = f" {r['tflops_per_gpu']:9.3g}" + (f" {100 * r['mfu']:5.1f}%" if mfu else "")
        print(
            f"{r['preset']:18} {r['documents']:9} {r['pattern']:10} {r['params']:11,} {r['params_active']:11,} "
            f"{r['seq_len']:5d} {step:>17} {r['tokens_per_s']:10,.0f}{util} {r['vs_baseline']:6.2f}{iso}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
