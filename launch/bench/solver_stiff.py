"""`unroll bench solver --stiff`: plain Newton against damped Newton (kernels/newton_damping.py) on stiff
recurrences: ParaGRU and ParaLSTM mixers whose recurrent weights are their initialisation's times a scale
(×1: as initialised, Newton converges in a few steps; ×8 to ×12: |∂f/∂h| well above 1 where Newton's
iterates go, the regime where plain steps blow up), with the inputs of `unroll bench solver` (the mixer's
projection of RMS-normed activations). Per row, at the iteration cap (MAX_ITERS unless --max-iters): the
Newton iterations, the sequences left to the sequential fallback, and (damped) those solved after damped
steps. No timing: the table shows which path solves what; damped Newton costs a few elementwise passes
per iteration over plain (its trust test), and where it keeps sequences alive it runs the iterations up to
the cap that plain Newton, its sequences all overflowed, skips on its way to the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unroll.kernels import newton_solve

SCALES = (1.0, 8.0, 10.0, 12.0)


@dataclass
class StiffRow:
    cell: str
    dtype: str
    scale: float  # the recurrent weights' factor over their initialisation
    batch: int
    length: int
    width: int
    plain_iterations: int
    plain_fallbacks: int
    damped_iterations: int
    damped_fallbacks: int
    damped_solved: int  # sequences solved after damped steps
    max_err: float  # damped against plain Newton's solution (both finished by the fallback where needed)


def stiff_row(cell_name: str, scale: float, B: int, T: int, D: int, dtype: torch.dtype, max_iters: int | None):
    from unroll.launch.bench.solver import _problem  # the timing bench imports this module lazily

    mixer, u, h0 = _problem(cell_name, B, T, D, dtype, torch.device("cpu"))
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("a", "p"):  # the recurrent weights (ParaLSTM's peepholes too)
                p.mul_(scale)
        cell, kw = mixer.make_cell(), dict(structure=mixer.structure, max_iters=max_iters)
        h_plain, plain = newton_solve(cell, u, h0, damping="none", **kw)
        h_damped, damped = newton_solve(cell, u, h0, damping="trust_region", **kw)
    return StiffRow(
        cell_name,
        str(dtype).removeprefix("torch."),
        scale,
        B,
        T,
        D,
        plain.iterations,
        plain.fallback_sequences,
        damped.iterations,
        damped.fallback_sequences,
        damped.damped_sequences,
        float((h_plain - h_damped).abs().max()),
    )


def format_stiff(rows: list[StiffRow]) -> str:
    head = (
        f"{'cell':5} {'dtype':8} {'scale':>5} {'B':>3} {'T':>6} {'D':>4} | {'plain iters':>11} {'fallback':>8} | "
        f"{'damped iters':>12} {'fallback':>8} {'damped':>6} | {'max err':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.cell:5} {r.dtype:8} {r.scale:5g} {r.batch:3d} {r.length:6d} {r.width:4d} | {r.plain_iterations:11d} "
            f"{r.plain_fallbacks:8d} | {r.damped_iterations:12d} {r.damped_fallbacks:8d} {r.damped_solved:6d} | "
            f"{r.max_err:8.1e}"
        )
    return "\n".join(lines)


def stiff_table(cells: list[str], dtypes: list[torch.dtype], B: int, T: int, D: int, max_iters: int | None) -> int:
    """Prints the table (a row as soon as it is measured), then the fallback totals."""
    rows: list[StiffRow] = []
    for dtype in dtypes:
        for cell_name in cells:
            for scale in SCALES:
                rows.append(stiff_row(cell_name, scale, B, T, D, dtype, max_iters))
                lines = format_stiff(rows).splitlines()
                print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)
    plain, damped = sum(r.plain_fallbacks for r in rows), sum(r.damped_fallbacks for r in rows)
    print(f"sequences left to the sequential fallback: plain {plain}, damped {damped}, of {B * len(rows)}")
    return 0
