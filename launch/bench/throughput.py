"""`unroll bench throughput`: training tokens per second of model presets, side by side in one run, as
ratios to a baseline preset (by default the tiny presets of every family vs tiny-transformer on CPU).

Each preset's model trains (forward, backward and AdamW step, with MoE bias updates) on random tokens of
its own sequence length and a fixed batch. All models are built first; then the presets alternate step
by step, one step each per round, so that a load change on the machine falls on every preset alike.
Printed per preset: the step time's minimum and median over --rounds, tokens/s of the median, and the
ratio of that to the baseline's. Random tokens make the timing independent of the corpus; the work per
step is the real one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from unroll.launch.bench import harness
from unroll.models import LM
from unroll.train.config import load_config
from unroll.train.step import update_expert_bias

TINY = ["tiny-transformer", "tiny-gru", "tiny-lstm", "tiny-m2rnn", "tiny-moe"]


def _step_fn(model: LM, tokens: torch.Tensor, optimizer: torch.optim.Optimizer):
    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model, tokens.device)

    return step


def run(presets: list[str], batch: int, seq_len: int | None, rounds: int, device: torch.device) -> list[dict]:
    rows: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], None]] = {}
    for i, name in enumerate(presets):
        cfg = load_config(name).model
        T = seq_len or load_config(name).data.seq_len
        torch.manual_seed(0)
        model = LM(cfg).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[i] = _step_fn(model, tokens, optimizer)
        rows.append(
            {
                "preset": name,
                "pattern": cfg.pattern,
                "params": model.num_params(),
                "params_active": model.active_params(),
                "batch": batch,
                "seq_len": T,
            }
        )
    times = harness.alternate(steps, device, rounds)
    for i, r in enumerate(rows):
        t = times[i]
        r.update(step_ms=t.median * 1e3, step_min_ms=t.min * 1e3, tokens_per_s=batch * r["seq_len"] / t.median)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_baseline"] = r["tokens_per_s"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", default=",".join(TINY), help="comma-separated; the first is the baseline")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: each preset's data.seq_len")
    harness.add_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    with harness.session(args.threads, prog="unroll bench throughput"):
        rows = run(args.presets.split(","), args.batch, args.seq_len, args.rounds, torch.device(args.device))
        print(
            f"training step (fwd+bwd+AdamW), batch {args.batch}, {args.device}, {args.rounds} rounds, the presets "
            f"alternating; tokens/s of the median step; ratio = tokens/s over {rows[0]['preset']}'s (of the "
            f"{harness.RATIOS_OF})"
        )
    print(
        f"{'preset':18} {'pattern':10} {'params':>11} {'active':>11} {'T':>5} {'step ms min/med':>17} "
        f"{'tokens/s':>10} {'ratio':>6}"
    )
    for r in rows:
        step = f"{r['step_min_ms']:.1f}/{r['step_ms']:.1f}"
        print(
            f"{r['preset']:18} {r['pattern']:10} {r['params']:11,} {r['params_active']:11,} {r['seq_len']:5d} "
            f"{step:>17} {r['tokens_per_s']:10,.0f} {r['vs_baseline']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
