"""`unroll bench throughput`: training tokens per second of model presets, side by side in one run, as
ratios to a baseline preset (by default the tiny presets of every family vs tiny-transformer on CPU).

Each preset's model trains for a few steps (forward, backward and AdamW step, with MoE bias updates) on
random tokens of its own sequence length and a fixed batch; the median step time after a warm-up gives
tokens/s. Random tokens make the timing independent of the corpus; the work per step is the real one.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from unroll.launch.bench.timing import measure
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


def run(presets: list[str], batch: int, seq_len: int | None, repeat: int, device: torch.device) -> list[dict]:
    rows = []
    for name in presets:
        cfg = load_config(name).model
        T = seq_len or load_config(name).data.seq_len
        torch.manual_seed(0)
        model = LM(cfg).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seconds = measure(_step_fn(model, tokens, optimizer), device, repeat=repeat, warmup=1)
        rows.append(
            {
                "preset": name,
                "pattern": cfg.pattern,
                "params": model.num_params(),
                "params_active": model.active_params(),
                "batch": batch,
                "seq_len": T,
                "step_ms": seconds * 1e3,
                "tokens_per_s": batch * T / seconds,
            }
        )
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
    p.add_argument("--repeat", type=int, default=5, help="timed steps (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.presets.split(","), args.batch, args.seq_len, args.repeat, torch.device(args.device))
    print(
        f"training step (fwd+bwd+AdamW), batch {args.batch}, {args.device}, {torch.get_num_threads()} threads; "
        f"ratio = tokens/s over {rows[0]['preset']}'s"
    )
    print(
        f"{'preset':18} {'pattern':10} {'params':>11} {'active':>11} {'T':>5} {'step ms':>9} {'tokens/s':>10} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['preset']:18} {r['pattern']:10} {r['params']:11,} {r['params_active']:11,} {r['seq_len']:5d} "
            f"{r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {r['vs_baseline']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
