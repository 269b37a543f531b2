"""`unroll bench growth`: G_stack (grow a trained small model g× deeper, keep training) against training the
deep model from scratch, at CPU scale, with the real commands' code (`unroll train`, `unroll grow`).

  1. small:    an L-layer model (--pattern) trains --small-steps steps;
  2. stacked:  `unroll grow` makes it g·L layers (--factor); it trains --grown-steps more steps (fresh
               optimizer and schedule, on the data after the small model's);
  3. scratch:  the g·L-layer model trains --small-steps + --grown-steps steps from a random start.
All three read the same data stream (same seed; the stacked run continues where the small one stopped) and
validate on the same fixed sequences every --eval-every steps. The target is scratch's final validation
loss; for each curve, the tokens to first reach it (interpolated linearly between validations; G_stack's
tokens count the small model's) and the ratio scratch / G_stack (> 1: growth saved tokens). The compute
ratio weighs each phase's tokens by its model's parameters (6·N·tokens). "not reached" when the stacked
run never gets to the target: then there is no ratio.

What is measured is tokens and losses, not time, so a load change on the machine cannot tilt it and
nothing alternates (the harness's part is the machine line, the oversubscription warning and --threads).
At the defaults it is one seed at a scale far below the paper's: it shows that the pipeline works end to
end, not how much growth saves.

Data: --train/--valid/--tokenizer (prepared shards and a tokenizer), else the `make run` corpus under
runs/data when it exists, else the bundled Shakespeare plays tokenized into --work (cached there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from unroll.launch.bench import harness
from unroll.train.config import load_config
from unroll.train.lifecycle.grow import grow, grow_pattern
from unroll.train.metrics import read_metrics

MAKE_RUN_DATA = ("runs/data/shakespeare/train", "runs/data/shakespeare/valid", "runs/data/shakespeare-bpe2048.model")


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the validation curve [(tokens, loss)] first reaches `target`, linear between points."""
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(tokens)
            t0, l0 = curve[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
    return None


def growth_ratios(
    t_scratch: float | None, t_stack: float | None, n_small: int, n_big: int, small_tokens: int
) -> tuple[float | None, float | None, str | None]:
    """(tokens ratio scratch / G_stack, compute ratio by 6·N·tokens, why there is none). G_stack's tokens are 0
    when the curve starts at the target: scratch's final loss is no lower than the untrained small model's, so
    scratch learnt nothing to compare against (too few steps)."""
    if t_stack is None or t_scratch is None:
        return None, None, "G_stack did not reach the target"
    if t_stack == 0:
        return None, None, "scratch ended no lower than the untrained model: train longer"
    flops_stack = 6 * (n_small * min(t_stack, small_tokens) + n_big * max(0.0, t_stack - small_tokens))
    return t_scratch / t_stack, 6 * n_big * t_scratch / flops_stack, None


def val_curve(run_dir: Path, tokens_per_step: int, offset: int = 0) -> list[tuple[int, float]]:
    return [(offset + r["step"] * tokens_per_step, r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def _data(args, work: Path) -> tuple[str, str, str]:
    if args.train:
        return args.train, args.valid, args.tokenizer
    if all(Path(p + suffix).is_file() for p, suffix in zip(MAKE_RUN_DATA, (".idx", ".idx", ""))):
        return MAKE_RUN_DATA
    from unroll.data.sentencepiece_tokenizer import train_tokenizer
    from unroll.data.shards import prepare_shards

    data = work / "data"
    tokenizer = data / "bpe512.model"
    if not (data / "shards" / "valid.idx").is_file():
        data.mkdir(parents=True, exist_ok=True)
        train_tokenizer("bundled:shakespeare", str(data / "bpe512"), 512)
        prepare_shards("bundled:shakespeare", str(tokenizer), str(data / "shards"), valid_fraction=0.05, num_proc=1)
    return str(data / "shards" / "train"), str(data / "shards" / "valid"), str(tokenizer)


def _overrides(args, run_dir: Path, data: tuple[str, str, str], pattern: str, steps: int) -> list[str]:
    from unroll.data.tokenizer import load_tokenizer

    train, valid, tokenizer = data
    return [
        f"run.dir={run_dir}",
        f"run.threads={args.threads}",
        f"model.pattern={pattern}",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.n_heads}",
        f"model.vocab_size={load_tokenizer(tokenizer).vocab_size}",
        f"data.train=[{train}]",
        f"data.valid={valid}",
        f"data.tokenizer={tokenizer}",
        f"data.seq_len={args.seq_len}",
        f"train.steps={steps}",
        f"train.batch_size={args.batch}",
        f"train.seed={args.seed}",
        f"train.log_every={args.eval_every}",
        f"optim.lr={args.lr}",
        f"schedule.warmup_steps={args.warmup}",
        f"eval.every={args.eval_every}",
        f"eval.batches={args.eval_batches}",
        f"eval.batch_size={args.batch}",
        "checkpoint.every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        "sample.max_new_tokens=0",
    ]


def run(args) -> dict:
    from unroll.models import LM
    from unroll.train.trainer import train

    work = Path(args.work)
    for name in ("small", "stacked", "scratch"):
        if (work / name).exists():
            raise SystemExit(f"unroll bench growth: {work / name} exists; use a fresh --work directory")
    work.mkdir(parents=True, exist_ok=True)
    data = _data(args, work)
    big = grow_pattern(args.pattern, args.factor)
    per_step = args.batch * args.seq_len
    with open(work / "train.log", "w") as log, contextlib.redirect_stdout(log):
        small = load_config(None, _overrides(args, work / "small", data, args.pattern, args.small_steps))
        train(small)
        grow(small.run.dir, args.factor, work / "stacked", [f"train.steps={args.grown_steps}"])
        stacked = load_config(str(work / "stacked" / "config.yaml"))
        train(stacked)
        scratch = load_config(None, _overrides(args, work / "scratch", data, big, args.small_steps + args.grown_steps))
        train(scratch)

    small_curve = val_curve(work / "small", per_step)
    # the grown run validates at its step 0 too, at the token count of the small run's last validation: one
    # point per token count (the curve the small model trained on up to the growth, the grown one after it)
    grown_at = args.small_steps * per_step
    grown_curve = [p for p in val_curve(work / "stacked", per_step, offset=grown_at) if p[0] > grown_at]
    stacked_curve = small_curve + grown_curve
    scratch_curve = val_curve(work / "scratch", per_step)
    target = scratch_curve[-1][1]
    t_scratch, t_stack = tokens_to_reach(scratch_curve, target), tokens_to_reach(stacked_curve, target)
    n_small, n_big = LM(small.model).num_params(), LM(scratch.model).num_params()
    small_tokens = args.small_steps * per_step
    ratio, compute_ratio, no_ratio = growth_ratios(t_scratch, t_stack, n_small, n_big, small_tokens)
    return {
        "pattern": args.pattern,
        "factor": args.factor,
        "grown_pattern": big,
        "params": [n_small, n_big],
        "small_steps": args.small_steps,
        "grown_steps": args.grown_steps,
        "tokens_per_step": per_step,
        "final_val_loss": {"small": small_curve[-1][1], "stacked": stacked_curve[-1][1], "scratch": target},
        "target_val_loss": target,
        "tokens_scratch": t_scratch,
        "tokens_stacked": t_stack,
        "small_tokens": small_tokens,
        "ratio": ratio,
        "compute_ratio": compute_ratio,
        "no_ratio": no_ratio,
        "curves": {"stacked": stacked_curve, "scratch": scratch_curve},
    }


def report(r: dict) -> str:
    s, g = r["small_steps"], r["grown_steps"]
    lines = [
        f"G_stack growth vs scratch: {r['pattern']!r} ×{r['factor']} → {r['grown_pattern']!r} "
        f"({r['params'][0]:,} → {r['params'][1]:,} parameters), {r['tokens_per_step']:,} tokens per step",
        f"{'run':10} {'steps':>12} {'tokens':>12} {'final val loss':>15}",
        f"{'small':10} {s:12d} {s * r['tokens_per_step']:12,d} {r['final_val_loss']['small']:15.4f}",
        f"{'stacked':10} {f'{s} + {g}':>12} {(s + g) * r['tokens_per_step']:12,d} {r['final_val_loss']['stacked']:15.4f}",
        f"{'scratch':10} {s + g:12d} {(s + g) * r['tokens_per_step']:12,d} {r['final_val_loss']['scratch']:15.4f}",
        f"target val loss (scratch's final): {r['target_val_loss']:.4f}",
        f"tokens to reach it: scratch {r['tokens_scratch']:,.0f}, G_stack "
        + (
            "not reached"
            if r["tokens_stacked"] is None
            else f"{r['tokens_stacked']:,.0f} (incl. {r['small_tokens']:,} of the small model)"
        ),
    ]
    if r["ratio"] is None:
        lines.append(f"ratio (scratch / G_stack tokens): n/a ({r['no_ratio']})")
    else:
        lines.append(
            f"ratio (scratch / G_stack tokens): {r['ratio']:.3f}; compute ratio (6·N·tokens): {r['compute_ratio']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench growth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pattern", default="GA", help="the small model's layers")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--small-steps", type=int, default=150)
    p.add_argument("--grown-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    harness.add_arguments(p, rounds=False, threads_help="torch threads, here and in the runs' run.threads")
    p.add_argument("--train", default=None, help="train shard prefix (with --valid and --tokenizer)")
    p.add_argument("--valid", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--work", default="runs/bench-growth", help="run directories and logs (must not hold runs)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.train and not (args.valid and args.tokenizer):
        p.error("--train needs --valid and --tokenizer")
    if args.factor < 2 or args.small_steps < 1 or args.grown_steps < 1 or args.eval_every < 1:
        p.error("--factor must be >= 2; --small-steps, --grown-steps and --eval-every >= 1")
    with harness.session(args.threads, prog="unroll bench growth", timed=False):
        result = run(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
