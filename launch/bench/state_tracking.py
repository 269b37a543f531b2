"""`unroll bench state-tracking`: tiny models of each family trained on parity and on S5 composition at
one length, evaluated at longer ones.

The claim under test: nonlinear RNNs (ParaGRU, ParaLSTM, M²RNN) learn these tasks and keep solving them
beyond the training length; attention does not. Every position is classified (the answer for the prefix
up to it), so "acc" is over all positions and "last" is the final position only (the hardest one). What
is measured is accuracy, not speed: the train and eval seconds are printed for planning only, so nothing
here alternates (the harness's part is the machine line, the oversubscription warning and --threads).

Every family asked for must build: one that does not (a pattern this checkout cannot build, a config it
rejects) is named with the reason and the bench exits 1 before training anything. `--exclude FAMILY,...`
leaves families out on purpose; they are listed as excluded in the output and the JSON.

Defaults: d_model 64, 2 layers, AdamW lr 1e-2 (warmup 10%, cosine to lr/10), batch 32, 1000 steps. The
learning rate is high for a reason: ParaGRU's recurrent coefficients start in [-0.5, 0.5] and a parity
flip-flop needs |a_c| > 1, which a smaller rate takes far longer to reach; the solution tends to appear
suddenly, after a plateau at the loss of guessing.

S5 is expected to stay unlearned at these defaults (loss ln 120 · 63/64 at length 64: only position 0,
the input itself, is learned), and the bench reports that rather than tuning it away: even position 1,
one look-up in the 120 × 120 composition table, takes many times these defaults' steps and batch to
learn, and every further position is harder, so length 64 needs a GPU, more width, or both. The diagonal
recurrences may not represent S5 at all: each ParaGRU/ParaLSTM channel is its own 1-D / 2-D system driven
by the layer's input, while tracking S5 means acting on the state with a non-solvable group, which mixes
channels; M²RNN's V×V recurrence mixes its state and is not ruled out by that argument. `--curriculum`
(the training length grows linearly from START to `--length` over the first `--ramp` of the steps at a
constant number of tokens per step, so the short early steps see more sequences for about the same cost),
`--ramp` and `--lr` are there for such a run. The curriculum is off by default (then the data stream is
exactly the one without it), and the header line says which was used.

S5: tokens are the 120 permutations of range(5) in itertools.permutations order (token 0 = identity).
The target at t is the product P_t = g_t ∘ … ∘ g_1 ∘ g_0 (g_0 applied first), where (g ∘ h)(i) = g[h[i]].
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from unroll.launch.bench import harness
from unroll.models.config import ModelConfig
from unroll.models.lm import LM

PERMS = list(itertools.permutations(range(5)))
_INDEX = {p: i for i, p in enumerate(PERMS)}
# COMPOSE[a, b] = index of PERMS[b] ∘ PERMS[a], i.e. a first, then b: the prefix product's update.
COMPOSE = torch.tensor([[_INDEX[tuple(q[p[i]] for i in range(5))] for q in PERMS] for p in PERMS])


def parity_batch(batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 2, (batch, length), generator=g)
    return x, x.cumsum(1) % 2


def s5_batch(batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, len(PERMS), (batch, length), generator=g)
    y = torch.empty_like(x)
    state = torch.zeros(batch, dtype=torch.long)  # the identity
    for t in range(length):
        state = COMPOSE[state, x[:, t]]
        y[:, t] = state
    return x, y


TASKS = {"parity": (parity_batch, 2), "s5": (s5_batch, len(PERMS))}  # generator, number of classes

# Tiny models, one per family; every one must build (`--exclude` leaves one out on purpose).
BASE: dict[str, Any] = dict(d_model=64, n_heads=4, tie_embeddings=False)  # untied: input symbols and answers differ
FAMILIES: dict[str, dict[str, Any]] = {
    "gru": dict(pattern="GG"),
    "lstm": dict(pattern="LL"),
    "m2rnn": dict(pattern="MM"),
    "transformer": dict(pattern="AA"),
}


def build(family: str, vocab: int) -> tuple[LM | None, str]:
    """(model, "") or (None, why this family cannot be built here)."""
    try:
        cfg = ModelConfig(**{**BASE, **FAMILIES[family], "vocab_size": vocab})
    except TypeError as e:  # a field this checkout's ModelConfig does not have
        return None, f"ModelConfig rejects the family's fields: {e}"
    if problems := cfg.problems():
        return None, "; ".join(f"{k}: {m}" for k, m in problems)
    try:
        return LM(cfg), ""
    except (ValueError, NotImplementedError, KeyError) as e:  # e.g. a pattern char lm.py cannot build yet
        return None, f"LM cannot build it: {e}"


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine down to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def length_at(step: int, steps: int, length: int, start: int = 0, ramp: float = 0.5) -> int:
    """The training length at `step`: without a curriculum (start 0, or start >= length) always `length`;
    with one it grows linearly from `start` to `length` over the first `ramp` of the steps, then stays."""
    if start <= 0 or start >= length:
        return length
    ramp_steps = max(1, round(ramp * steps))
    if step >= ramp_steps:
        return length
    return start + (length - start) * step // ramp_steps


def train(
    model: LM,
    task: str,
    steps: int,
    batch: int,
    length: int,
    lr: float,
    seed: int,
    curriculum: int = 0,
    ramp: float = 0.5,
) -> float:
    """AdamW on fresh batches each step (their length by `length_at`); returns the mean loss of the last
    10 steps."""
    make, classes = TASKS[task]
    g = torch.Generator().manual_seed(seed)  # the same data stream for every family
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        now = length_at(step, steps, length, curriculum, ramp)
        x, y = make(batch * length // now, now, g)  # the same number of tokens every step
        logits = model(x)[..., :classes]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / len(losses[-10:])


@torch.no_grad()
def evaluate(model: LM, x: torch.Tensor, y: torch.Tensor, classes: int, chunk: int = 64) -> tuple[float, float]:
    """(accuracy over all positions, accuracy at the last position)."""
    model.eval()
    pred = torch.cat([model(x[i : i + chunk])[..., :classes].argmax(-1) for i in range(0, len(x), chunk)])
    hit = pred == y
    return hit.float().mean().item(), hit[:, -1].float().mean().item()


def eval_set(task: str, length: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Its own seed per (task, length), disjoint from the training stream's, the same for every family.
    return TASKS[task][0](n, length, torch.Generator().manual_seed(10_000 + 1000 * seed + length))


def format_table(rows: list[dict], lengths: list[int], train_length: int) -> str:
    cells = [f"{'acc/last@' + str(L) + ('*' if L == train_length else ''):>15}" for L in lengths]
    head = f"{'family':12} {'task':7} {'steps':>6} {'loss':>7} {'train s':>8} {'eval s':>7} " + " ".join(cells)
    lines = [head, "-" * len(head)]
    for r in rows:
        accs = " ".join(f"{r['acc'][str(L)]:>9.3f}/{r['last_acc'][str(L)]:.2f}" for L in lengths)
        lines.append(
            f"{r['family']:12} {r['task']:7} {r['steps']:6d} {r['loss']:7.4f} {r['train_seconds']:8.1f} "
            f"{r['eval_seconds']:7.1f} {accs}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench state-tracking", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument(
        "--exclude",
        default="",
        metavar="FAMILIES",
        help="comma-separated families to leave out on purpose (listed as excluded); any other that fails to build "
        "is an error",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps per (family, task); default 1000, quick 3")
    p.add_argument("--length", type=int, default=64, help="training length")
    p.add_argument("--eval-lengths", default="64,256,512", help="the training length is always evaluated too")
    p.add_argument("--eval-samples", type=int, default=None, help="sequences per eval length; default 256, quick 8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument(
        "--curriculum",
        type=int,
        default=0,
        metavar="START",
        help="grow the training length from START to --length (constant tokens per step); 0 = off",
    )
    p.add_argument("--ramp", type=float, default=0.5, help="fraction of the steps the curriculum takes")
    p.add_argument("--seed", type=int, default=0)
    harness.add_arguments(p, threads_default=2, rounds=False)
    p.add_argument("--quick", action="store_true", help="a few steps and a small eval: checks the plumbing only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    families, tasks = args.families.split(","), args.tasks.split(",")
    excluded = [f for f in args.exclude.split(",") if f]
    unknown = [f for f in families + excluded if f not in FAMILIES] + [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown families/tasks {unknown}; families: {', '.join(FAMILIES)}; tasks: {', '.join(TASKS)}")
    families = [f for f in families if f not in excluded]
    steps = args.steps if args.steps is not None else (3 if args.quick else 1000)
    n_eval = args.eval_samples or (8 if args.quick else 256)
    lengths = sorted({args.length, *(int(L) for L in args.eval_lengths.split(","))})
    skipped = {f: "excluded with --exclude" for f in excluded}
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the caller's RNG stays
        unbuildable = {f: why for f in families if (why := build(f, vocab=len(PERMS))[1])}
    if unbuildable:
        for family, why in unbuildable.items():
            print(
                f"unroll bench state-tracking: family {family} does not build: {why} "
                f"(leave it out on purpose with --exclude {family})",
                file=sys.stderr,
            )
        return 1

    with harness.session(args.threads, prog="unroll bench state-tracking", timed=False):
        curriculum = (
            f"length curriculum {args.curriculum}→{args.length} over the first {args.ramp:g} of the "
            f"steps at {args.batch * args.length} tokens/step"
            if 0 < args.curriculum < args.length
            else "no length curriculum"
        )
        print(
            f"state tracking: train length {args.length}, {steps} steps × batch {args.batch}, lr {args.lr}, "
            f"{curriculum}, eval {n_eval} sequences at {lengths}, threads {args.threads}, "
            f"torch {torch.__version__}",
            flush=True,
        )
        for family in excluded:
            print(f"excluded {family} (--exclude)", flush=True)
        rows = []
        evals = {(t, L): eval_set(t, L, n_eval, args.seed) for t in tasks for L in lengths}
        for family in families:
            for task in tasks:
                classes = TASKS[task][1]
                with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                    torch.manual_seed(args.seed)
                    model, why = build(family, vocab=max(2, classes))
                    if model is None:  # it built above, with the larger vocabulary
                        raise RuntimeError(f"family {family} does not build with {classes} classes: {why}")
                    start = time.perf_counter()
                    loss = train(
                        model, task, steps, args.batch, args.length, args.lr, args.seed, args.curriculum, args.ramp
                    )
                    trained = time.perf_counter()
                    acc, last = {}, {}
                    for L in lengths:
                        acc[str(L)], last[str(L)] = evaluate(model, *evals[task, L], classes)
                rows.append(
                    dict(
                        family=family,
                        pattern=model.cfg.pattern,
                        task=task,
                        steps=steps,
                        loss=loss,
                        params=model.num_params(),
                        train_seconds=trained - start,
                        eval_seconds=time.perf_counter() - trained,
                        acc=acc,
                        last_acc=last,
                    )
                )
                print(
                    format_table(rows, lengths, args.length).splitlines()[-1]
                    if len(rows) > 1
                    else format_table(rows, lengths, args.length),
                    flush=True,
                )
    print(
        f"(acc over all positions / at the last position; * = training length; chance: parity 0.5, s5 "
        f"{1 / len(PERMS):.3f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    train_length=args.length,
                    eval_lengths=lengths,
                    steps=steps,
                    batch=args.batch,
                    lr=args.lr,
                    curriculum=args.curriculum,
                    ramp=args.ramp,
                    seed=args.seed,
                    eval_samples=n_eval,
                    rows=rows,
                    skipped=skipped,
                ),
                f,
                indent=1,
            )
    return 0
