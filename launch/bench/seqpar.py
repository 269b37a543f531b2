"""`unroll bench seqpar`: sequence-parallel Newton (newton_solve_seqpar) on 2 ranks against newton_solve on
1 rank, weak scaling, on ParaGRU (diagonal) and ParaLSTM (2×2 blocks), forward and forward+backward.

Weak scaling: every rank holds the same T_local steps, so the 1-rank run solves T_local steps and the
2-rank run a sequence of 2·T_local. Efficiency = 1-rank ms / 2-rank ms, of the medians (1.0 = perfect; it
includes any extra Newton iterations the longer sequence needs). The recurrence's inputs come from the
real mixer (its input projection of RMS-normed activations), as in `unroll bench solver`; the 1-rank
baseline solves the first T_local steps of the same problem with the same number of threads per process.

`main` launches the ranks itself (torch.distributed.run on this module's worker, gloo on CPU, nccl with one
GPU per rank on CUDA) and reads their results from one JSON file per rank. Launching ranks costs seconds,
so the two paths alternate inside that one launch: each round times one 2-rank solve, then the 1-rank
baseline on rank 0 while rank 1 waits at a barrier, every timed call starting at a barrier. A 2-rank
round counts as the slower rank's time; each time is printed as the minimum / median over --rounds. The
forward+backward pass includes the backward's own all_gather and one all-reduce (sum) of the cell's
parameter gradients, as training would do. Bytes are what each rank contributes: per Newton iteration
from bytes_per_iteration (with 2 ranks each rank also receives that much), per solve counted on the
collectives of the untimed warm-up call (forward: the first boundary exchange plus one all_gather per
residual check; forward+backward adds the backward's all_gather and the gradient all-reduce). The error
column is the max abs difference of the 2-rank solution from newton_solve on the full 2·T_local sequence
in one process.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from unroll.kernels import newton_solve
from unroll.kernels.seqpar_newton import bytes_per_iteration, newton_solve_seqpar
from unroll.launch.bench import harness
from unroll.launch.torchrun import finish_rank, rank_results, run_torchrun
from unroll.models.paragru import ParaGRU
from unroll.models.paralstm import ParaLSTM

CELLS = {"gru": ParaGRU, "lstm": ParaLSTM}
RANKS = 2

# (batch, T_local, width): the 2-rank run solves batch sequences of 2·T_local steps.
GRIDS = {
    "quick": [(1, 256, 64)],
    "cpu": [(1, 1024, 64), (1, 4096, 64), (8, 1024, 256)],
    "gpu": [(1, 4096, 64), (1, 16384, 64), (8, 4096, 1024), (16, 2048, 2048)],
}
PASSES = ("fwd", "fwd+bwd")


@dataclass
class Row:
    cell: str
    batch: int
    t_local: int  # steps per rank; the 2-rank sequence is 2·t_local long
    width: int
    dtype: str
    pass_: str  # fwd | fwd+bwd
    threads: int  # per process, 1-rank and 2-rank alike
    one_rank_ms: float  # newton_solve on t_local steps, median over the rounds
    two_rank_ms: float  # newton_solve_seqpar on 2·t_local steps, the slower rank, median over the rounds
    one_rank_min_ms: float  # minimum over the rounds
    two_rank_min_ms: float
    efficiency: float  # one_rank_ms / two_rank_ms
    iterations_1: int  # Newton iterations, 1 rank (t_local steps)
    iterations_2: int  # Newton iterations, 2 ranks (2·t_local steps; newton_solve's count on the full sequence)
    bytes_per_iteration: int  # bytes_per_iteration(...).sent_per_rank
    bytes_per_solve: int  # counted: bytes each rank contributed to the collectives of one pass
    collectives_per_solve: int  # counted
    max_err: float  # 2-rank solution vs newton_solve of the full sequence in one process, max abs
    fallback: str | None  # the 2-rank SolveInfo's fallback, None when Newton converged


def _structure(cell_name: str):
    """The mixer's Jacobian structure (RecurrentMixer.structure, from the class)."""
    k = CELLS[cell_name].state_size
    return "diag" if k == 1 else ("block", k)


def _problem(cell_name: str, B: int, T: int, D: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The mixer, its recurrence inputs u [B, T, 3, D] for the FULL sequence, and h0 (zeros)."""
    torch.manual_seed(seed)
    mixer = CELLS[cell_name](D, D).to(device=device, dtype=dtype)
    x = torch.nn.functional.rms_norm(torch.randn(B, T, D, device=device, dtype=dtype), (D,))
    with torch.no_grad():
        u = mixer.recurrence_inputs(x)
    return mixer, u, mixer.initial_state(None, u)


def _pass(solve, mixer, u, h0, backward: bool, grad_sync=None):
    """One forward (no autograd) or forward+backward of solve(cell, u, h0); grad_sync(params) after the backward."""
    if not backward:
        with torch.no_grad():
            return solve(mixer.make_cell(), u, h0, structure=mixer.structure)
    for p in mixer.parameters():
        p.grad = None
    u = u.detach().requires_grad_()
    h, info = solve(mixer.make_cell(), u, h0, structure=mixer.structure)
    h.sum().backward()
    if grad_sync is not None:
        grad_sync([p for p in mixer.parameters() if p.grad is not None])
    return h, info


# ---------------------------------------------------------------------------------------------- worker


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the ranks' partial parameter gradients, in one all_reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in params]
    assert all(g is not None for g in grads), "every parameter has a gradient after the backward"
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    dist.all_reduce(flat)
    for g, summed in zip(grads, flat.split([p.numel() for p in params])):
        assert g is not None
        g.copy_(summed.view_as(g))


class _Counting:
    """Counts the collectives (and the bytes this rank contributes to them) made inside the block."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "send")

    def __enter__(self):
        import torch.distributed as dist

        self.calls, self.bytes, self.real = 0, 0, {n: getattr(dist, n) for n in self.NAMES}
        for name, real in self.real.items():
            setattr(dist, name, self._wrap(real, 1 if name in ("all_gather_single", "all_gather_into_tensor") else 0))
        return self

    def _wrap(self, real, arg):
        def counted(*args, **kw):
            t = args[arg]
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
            return real(*args, **kw)

        return counted

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, real in self.real.items():
            setattr(dist, name, real)


def _time_both(two_ranks, one_rank, device: torch.device, rounds: int) -> dict[str, harness.Timing]:
    """The 2-rank pass and the 1-rank pass (on rank 0; the other ranks wait) alternating round by round,
    every timed call starting at a barrier, after one untimed warm-up of each. Per round, each path's time is
    the slowest rank's (the ranks idle in the 1-rank path take none), so every rank returns the same."""
    import torch.distributed as dist

    alone = dist.get_rank() == 0
    paths = {"two": two_ranks, "one": one_rank if alone else lambda: None}
    times = harness.alternate(paths, device, rounds, warmup=1, before=dist.barrier)
    slowest = torch.tensor([times["two"].seconds, times["one"].seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {name: harness.Timing(row) for name, row in zip(paths, slowest.tolist())}


def _worker_case(
    cell_name: str, B: int, T: int, D: int, dtype: torch.dtype, device: torch.device, rounds: int
) -> list[dict]:
    import torch.distributed as dist

    r = dist.get_rank()
    mixer, u_full, h0 = _problem(cell_name, B, RANKS * T, D, dtype, device)
    u = u_full[:, r * T : (r + 1) * T].contiguous()
    first = u_full[:, :T].contiguous()  # rank 0's slice: what one rank alone solves
    with torch.no_grad():
        ref, ref_info = newton_solve(mixer.make_cell(), u_full, h0, structure=mixer.structure)
        h, info = newton_solve_seqpar(mixer.make_cell(), u, h0, structure=mixer.structure)
        _, one_info = newton_solve(mixer.make_cell(), first, h0, structure=mixer.structure)
    err = torch.tensor([float((h - ref[:, r * T : (r + 1) * T]).abs().max())], dtype=torch.float64, device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    out = []
    for backward in (False, True):
        with _Counting() as counted:  # the warm-up's collectives; _time_both's own warm-up follows
            _pass(newton_solve_seqpar, mixer, u, h0, backward, _all_reduce_grads)
        times = _time_both(
            lambda: _pass(newton_solve_seqpar, mixer, u, h0, backward, _all_reduce_grads),
            lambda: _pass(newton_solve, mixer, first, h0, backward),
            device,
            rounds,
        )
        out.append(
            {
                "cell": cell_name,
                "batch": B,
                "t_local": T,
                "width": D,
                "pass_": PASSES[backward],
                "two_rank_ms": times["two"].median * 1e3,
                "two_rank_min_ms": times["two"].min * 1e3,
                "one_rank_ms": times["one"].median * 1e3,
                "one_rank_min_ms": times["one"].min * 1e3,
                "iterations_1": one_info.iterations,
                "iterations_2": info.iterations,
                "ref_iterations": ref_info.iterations,
                "bytes_per_solve": counted.bytes,
                "collectives_per_solve": counted.calls,
                "max_err": float(err),
                "fallback": info.fallback,
            }
        )
    return out


def worker(spec_path: str) -> int:
    """One rank of the 2-rank part, under torch.distributed.run: writes OUT/rank{r}.json, {"rows": [...]} or
    {"error": traceback}, then ends at a barrier without destroying the process group (gloo ranks were seen to abort in
    its teardown)."""
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    faulthandler.dump_traceback_later(max(30, spec["timeout"] - 10), exit=True)
    torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=spec["collective_timeout"]))
    rank = dist.get_rank()
    try:
        rows = []
        for cell_name in spec["cells"]:
            for B, T, D in spec["grid"]:
                rows.extend(_worker_case(cell_name, B, T, D, getattr(torch, spec["dtype"]), device, spec["rounds"]))
        result: dict = {"rows": rows}
    except Exception:
        result = {"error": traceback.format_exc()}
    finish_rank(spec["out"], rank, result)


# ---------------------------------------------------------------------------------------------- driver


def run_ranks(spec: dict, timeout: float) -> list[dict]:
    """The rows (rank 0's, the times being the slower rank's already), or RuntimeError (TorchrunError where
    the ranks time out or fail)."""
    with tempfile.TemporaryDirectory(prefix="unroll-seqpar-") as tmp:
        spec = dict(spec, out=tmp, timeout=timeout)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        proc = run_torchrun(["-m", "unroll.launch.bench.seqpar", "--worker", str(spec_path)], RANKS, env, timeout)
        results = [res["rows"] for res in rank_results(Path(tmp), RANKS, proc)]
    for mine, other in zip(*results):  # SolveInfo and the all-reduced figures agree across ranks
        for key in ("two_rank_ms", "one_rank_ms", "iterations_2", "max_err", "fallback"):
            if mine[key] != other[key]:
                raise RuntimeError(f"ranks disagree on {key}: {mine} vs {other}")
    return results[0]


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'cell':5} {'B':>3} {'T/rank':>6} {'D':>5} {'pass':8} {'1-rank ms':>15} {'2-rank ms':>15} "
        f"{'effic.':>7} {'it 1r':>5} {'it 2r':>5} {'B/iter/rank':>11} {'B/solve/rank':>12} {'coll':>4} "
        f"{'max |Δ|':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.cell:5} {r.batch:3d} {r.t_local:6d} {r.width:5d} {r.pass_:8} "
            f"{f'{r.one_rank_min_ms:.2f}/{r.one_rank_ms:.2f}':>15} {f'{r.two_rank_min_ms:.2f}/{r.two_rank_ms:.2f}':>15} "
            f"{r.efficiency:7.2f} {r.iterations_1:5d} {r.iterations_2:5d} "
            f"{r.bytes_per_iteration:11,d} {r.bytes_per_solve:12,d} {r.collectives_per_solve:4d} "
            f"{r.max_err:8.1e}" + (f"  {r.fallback}" if r.fallback else "")
        )
    return "\n".join(lines)


def _launch(args, device: torch.device, grid: list, cells: list[str]) -> list[dict] | None:
    """Prints the header and notes, runs the ranks; their rows, or None after printing why they failed."""
    cores = os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}, torch {torch.__version__}, "
        f"{cores} cores; {RANKS} ranks × {args.threads} thread(s) vs 1 rank × {args.threads} thread(s); "
        f"weak scaling: T/rank steps per rank (2 ranks solve 2·T/rank); effic. = 1-rank ms / 2-rank ms"
    )
    if device.type == "cpu" and RANKS * args.threads >= cores:
        print(
            f"note: {RANKS} ranks × {args.threads} thread(s) on {cores} cores: the ranks share the cores with each "
            f"other (and with gloo's threads and anything else running), so the efficiency here understates what "
            f"ranks on separate machines would reach"
        )
    elif device.type == "cpu":
        print(
            f"note: the {RANKS} ranks share one machine (memory bandwidth, gloo over loopback); other processes "
            f"on it add noise"
        )
    spec = {
        "cells": cells,
        "grid": grid,
        "rounds": args.rounds,
        "threads": args.threads,
        "dtype": args.dtype,
        "device": device.type,
        "collective_timeout": min(300.0, args.timeout),
    }
    start = time.perf_counter()
    try:
        rows = run_ranks(spec, args.timeout)
    except RuntimeError as e:
        print(f"unroll bench seqpar: {e}", file=sys.stderr)
        return None
    print(f"the ranks' runs done in {time.perf_counter() - start:.1f} s (including the launch)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    p = argparse.ArgumentParser(
        prog="unroll bench seqpar", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: nccl, one GPU per rank")
    p.add_argument("--grid", choices=sorted(GRIDS), default=None, help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--cells", default="gru,lstm")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    harness.add_arguments(p, threads_default=1, threads_help="torch threads per rank (the 1-rank baseline alike)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole 2-rank run")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < RANKS:
        print(
            f"unroll bench seqpar: --device cuda needs {RANKS} GPUs (one per rank), found {torch.cuda.device_count()}",
            file=sys.stderr,
        )
        return 2
    grid = GRIDS[args.grid or ("gpu" if device.type == "cuda" else "cpu")]
    cells = args.cells.split(",")
    if not set(cells) <= set(CELLS):
        p.error(f"--cells: choose from {','.join(CELLS)}")
    dtype = getattr(torch, args.dtype)
    with harness.session(args.threads, RANKS, prog="unroll bench seqpar"):
        two = _launch(args, device, grid, cells)
    if two is None:
        return 1
    rows = []
    for w in two:
        comm = bytes_per_iteration(w["batch"], w["width"], RANKS, structure=_structure(w["cell"]), dtype=dtype)
        rows.append(
            Row(
                w["cell"],
                w["batch"],
                w["t_local"],
                w["width"],
                args.dtype,
                w["pass_"],
                args.threads,
                w["one_rank_ms"],
                w["two_rank_ms"],
                w["one_rank_min_ms"],
                w["two_rank_min_ms"],
                w["one_rank_ms"] / w["two_rank_ms"],
                w["iterations_1"],
                w["iterations_2"],
                comm.sent_per_rank,
                w["bytes_per_solve"],
                w["collectives_per_solve"],
                w["max_err"],
                w["fallback"],
            )
        )
    print(format_table(rows))
    print(
        f"ms = min/median over {args.rounds} round(s), 2 ranks and 1 rank alternating, after one warm-up; 2-rank "
        f"time = the slower rank's; effic. of the {harness.RATIOS_OF}; B/solve/rank and coll(ectives) counted on "
        f"the warm-up call"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
