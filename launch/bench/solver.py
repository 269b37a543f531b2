"""`unroll bench solver`: the linear-time sequential loop vs Newton (PyTorch scan) vs Newton (Triton scan) vs
the fused Newton kernel (kernels/fused_newton.py: the whole solve in one launch; CUDA only) vs Newton with its
elementwise work compiled (newton_kernel=compiled, kernels/newton.py's compiled_pieces; off CUDA, unless
--no-compiled) on ParaGRU and ParaLSTM recurrences, forward and forward+backward, over a grid of shapes.

The recurrence's inputs come from the real mixer (its input projection of RMS-normed activations), so
the Newton iteration counts are those of training at initialisation. For each shape and pass the solvers
alternate round by round (sequential, Newton, Triton, sequential, ...); each time is printed as the
minimum / median over --rounds, and each ratio is sequential time over that solver's time, of the medians.
"auto" is what solver="auto" picks for the shape; auto/best is its median time over the fastest median.
On a sequence longer than --sequential-steps the loop runs only its first N steps and its time is scaled
by T/N (marked *): its work is one cell call per step, so its time is linear in T, and at T = 131072 the
whole loop would take minutes; its max err is then over those N steps.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from unroll.kernels import newton_solve, sequential_solve
from unroll.kernels.linear_scan import scan_reference
from unroll.launch.bench import harness
from unroll.models.paragru import ParaGRU
from unroll.models.paralstm import ParaLSTM
from unroll.models.recurrent import pick_solver

CELLS = {"gru": ParaGRU, "lstm": ParaLSTM}

# (batch, length, width): the latency-bound regime first (few channels, long sequences), then shapes
# where per-step work is large and the sequential loop is hard to beat on a CPU.
GRIDS = {
    "cpu": [(1, 16384, 64), (1, 4096, 64), (4, 2048, 128), (8, 1024, 256), (32, 128, 192), (16, 512, 512)],
    "quick": [(1, 2048, 64), (8, 256, 128)],
    "gpu": [(1, 4096, 64), (1, 16384, 64), (1, 131072, 64), (8, 4096, 1024), (16, 2048, 2048)],
}


@dataclass
class Row:
    cell: str
    batch: int
    length: int
    width: int
    dtype: str
    pass_: str  # fwd | fwd+bwd
    sequential_ms: float  # median over the rounds
    newton_ms: float
    triton_ms: float | None
    sequential_min_ms: float  # minimum over the rounds
    newton_min_ms: float
    triton_min_ms: float | None
    iterations: int
    max_err: float  # Newton (torch scan) vs sequential, max abs over the output
    auto: str  # what solver="auto" picks here
    auto_slowdown: float  # the time of what auto runs / the fastest of the measured paths
    sequential_steps: int  # steps the loop ran; below length, its times are scaled by length / sequential_steps
    fused_ms: float | None = None  # the fused Newton kernel (CUDA only): median, minimum, max err vs the loop
    fused_min_ms: float | None = None
    fused_max_err: float | None = None
    compiled_ms: float | None = None  # newton_solve(compiled=True): median, minimum (its first call, which
    compiled_min_ms: float | None = None  # compiles, is the untimed warm-up)


def _problem(cell_name: str, B: int, T: int, D: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    mixer = CELLS[cell_name](D, D).to(device=device, dtype=dtype)
    x = torch.nn.functional.rms_norm(torch.randn(B, T, D, device=device, dtype=dtype), (D,))
    with torch.no_grad():
        u = mixer.recurrence_inputs(x)
    h0 = mixer.initial_state(None, u)
    return mixer, u, h0


def _run_fused(mixer, u, h0, backward: bool):
    from unroll.kernels.fused_newton import fused_newton_solve

    if not backward:
        with torch.no_grad():
            return fused_newton_solve(mixer.make_cell(), u, h0)
    u = u.detach().requires_grad_()
    h, info = fused_newton_solve(mixer.make_cell(), u, h0)
    h.sum().backward()
    return h, info


def _run(solve, mixer, u, h0, backward: bool, **kw):
    if not backward:
        with torch.no_grad():
            return solve(mixer.make_cell(), u, h0, structure=mixer.structure, **kw)
    u = u.detach().requires_grad_()
    h, info = solve(mixer.make_cell(), u, h0, structure=mixer.structure, **kw)
    h.sum().backward()
    return h, info


def _scaled(t: harness.Timing, factor: float) -> harness.Timing:
    return harness.Timing([s * factor for s in t.seconds])


def bench_case(
    cell_name: str,
    B: int,
    T: int,
    D: int,
    dtype: torch.dtype,
    device: torch.device,
    triton_impl,
    rounds: int,
    sequential_steps: int = 0,
    compiled: bool = False,
) -> list[Row]:
    """sequential_steps: the loop runs at most this many steps (0: all T), its time scaled to T; compiled:
    also time newton_solve(compiled=True)."""
    mixer, u, h0 = _problem(cell_name, B, T, D, dtype, device)
    auto = pick_solver("auto", device, B, T, D, mixer.state_size)
    n = min(T, sequential_steps) if sequential_steps > 0 else T
    u_head = u[:, :n].contiguous()  # a prefix of a causal recurrence: its solution is the prefix of the whole
    rows = []
    for backward in (False, True):
        paths = {
            "sequential": lambda: _run(sequential_solve, mixer, u_head, h0, backward),
            "newton": lambda: _run(newton_solve, mixer, u, h0, backward, scan_impl=scan_reference),
        }
        if triton_impl is not None:  # CUDA: the Triton scan and the fused kernel
            paths["triton"] = lambda: _run(newton_solve, mixer, u, h0, backward, scan_impl=triton_impl)
            paths["fused"] = lambda: _run_fused(mixer, u, h0, backward)
        if compiled:
            paths["compiled"] = lambda: _run(
                newton_solve, mixer, u, h0, backward, scan_impl=scan_reference, compiled=True
            )
        t = harness.alternate(paths, device, rounds)
        seq, newton, triton, fused = _scaled(t["sequential"], T / n), t["newton"], t.get("triton"), t.get("fused")
        comp = t.get("compiled")
        h_seq, _ = _run(sequential_solve, mixer, u_head, h0, False)
        h_new, info = _run(newton_solve, mixer, u, h0, False, scan_impl=scan_reference)
        fused_err = None if fused is None else float((h_seq - _run_fused(mixer, u, h0, False)[0][:, :n]).abs().max())
        # what auto runs on CUDA: the fused kernel (model.newton_kernel=auto)
        auto_time = seq if auto == "sequential" else (fused or newton)
        best = min((x for x in (seq, newton, triton, fused, comp) if x is not None), key=lambda x: x.median)
        rows.append(
            Row(
                cell_name,
                B,
                T,
                D,
                str(dtype).removeprefix("torch."),
                "fwd+bwd" if backward else "fwd",
                seq.median * 1e3,
                newton.median * 1e3,
                triton.median * 1e3 if triton else None,
                seq.min * 1e3,
                newton.min * 1e3,
                triton.min * 1e3 if triton else None,
                info.iterations,
                float((h_seq - h_new[:, :n]).abs().max()),
                auto,
                harness.ratio(auto_time, best),
                n,
                fused.median * 1e3 if fused else None,
                fused.min * 1e3 if fused else None,
                fused_err,
                comp.median * 1e3 if comp else None,
                comp.min * 1e3 if comp else None,
            )
        )
    return rows


def _ms(low: float, mid: float) -> str:
    return f"{low:.2f}/{mid:.2f}"


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'cell':5} {'B':>3} {'T':>6} {'D':>5} {'dtype':8} {'pass':8} {'seq ms':>19} {'newton ms':>15} "
        f"{'ratio':>7} {'triton ms':>15} {'ratio':>7} {'fused ms':>15} {'ratio':>7} {'compiled ms':>15} {'ratio':>7} "
        f"{'iters':>5} {'max err':>8} "
        f"{'auto':>10} {'auto/best':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        tri = (
            f"{_ms(r.triton_min_ms, r.triton_ms):>15} {r.sequential_ms / r.triton_ms:6.1f}x"
            if r.triton_ms and r.triton_min_ms is not None
            else f"{'n/a':>15} {'':>7}"
        )
        fus = (
            f"{_ms(r.fused_min_ms, r.fused_ms):>15} {r.sequential_ms / r.fused_ms:6.1f}x"
            if r.fused_ms and r.fused_min_ms is not None
            else f"{'n/a':>15} {'':>7}"
        )
        comp = (
            f"{_ms(r.compiled_min_ms, r.compiled_ms):>15} {r.sequential_ms / r.compiled_ms:6.1f}x"
            if r.compiled_ms and r.compiled_min_ms is not None
            else f"{'n/a':>15} {'':>7}"
        )
        seq = _ms(r.sequential_min_ms, r.sequential_ms) + ("*" if r.sequential_steps < r.length else "")
        lines.append(
            f"{r.cell:5} {r.batch:3d} {r.length:6d} {r.width:5d} {r.dtype:8} {r.pass_:8} "
            f"{seq:>19} {_ms(r.newton_min_ms, r.newton_ms):>15} "
            f"{r.sequential_ms / r.newton_ms:6.1f}x {tri} {fus} {comp} {r.iterations:5d} {r.max_err:8.1e} {r.auto:>10} "
            f"{r.auto_slowdown:8.2f}x"
        )
    return "\n".join(lines)


def _shape(p: argparse.ArgumentParser, text: str) -> tuple[int, int, int]:
    """--shape B,T,D, or the parser's error naming it."""
    try:
        B, T, D = (int(n) for n in text.split(","))
    except ValueError:
        p.error(f"--shape {text}: expected B,T,D (three positive integers)")
    if min(B, T, D) < 1:
        p.error(f"--shape {text}: expected B,T,D (three positive integers)")
    return B, T, D


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench solver", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=sorted(GRIDS), default=None, help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--cells", default="gru,lstm")
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="B,T,D",
        help="this shape instead of the grid's (repeatable), e.g. --shape 1,16384,64",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--sequential-steps",
        type=int,
        default=16384,
        metavar="N",
        help="time the loop on at most N steps of a longer sequence, scaled by T/N (0: every step; default %(default)s)",
    )
    harness.add_arguments(p)
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="leave out the compiled Newton (its first call per cell and pass compiles, seconds; off CUDA only)",
    )
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument(
        "--stiff",
        action="store_true",
        help="instead: plain vs damped Newton on mixers with scaled-up recurrent weights, float32 and float64 "
        "(iterations and fallbacks, no timing; launch/bench/solver_stiff.py)",
    )
    args = p.parse_args(argv)
    if args.stiff:
        from unroll.launch.bench.solver_stiff import stiff_table

        with harness.session(args.threads, prog="unroll bench solver --stiff", timed=False):
            return stiff_table(args.cells.split(","), [torch.float32, torch.float64], 16, 2048, 8, None)
    device = torch.device(args.device)
    grid = GRIDS[args.grid or ("gpu" if device.type == "cuda" else "cpu")]
    if args.shape:
        grid = [_shape(p, shape) for shape in args.shape]
    triton_impl = None
    if device.type == "cuda":
        from unroll.kernels.triton_scan import scan_triton

        triton_impl = scan_triton
    with harness.session(args.threads, prog="unroll bench solver"):
        print(
            f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}; "
            f"ms = min/median over {args.rounds} rounds, the solvers alternating; ratios of the {harness.RATIOS_OF}"
        )
        rows = []
        for cell_name in args.cells.split(","):
            for B, T, D in grid:
                dtype = getattr(torch, args.dtype)
                compiled = device.type != "cuda" and not args.no_compiled
                rows.extend(
                    bench_case(
                        cell_name, B, T, D, dtype, device, triton_impl, args.rounds, args.sequential_steps, compiled
                    )
                )
                lines = format_table(rows).splitlines()
                print("\n".join(lines[:2] + lines[-2:]) if len(rows) == 2 else "\n".join(lines[-2:]), flush=True)
    worst = max(r.auto_slowdown for r in rows)
    if any(r.sequential_steps < r.length for r in rows):
        print(f"* the loop timed on its first {args.sequential_steps} steps, scaled by T/{args.sequential_steps}")
    print(f"auto vs the fastest path: worst {worst:.2f}x over {len(rows)} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0
