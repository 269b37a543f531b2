"""`unroll bench m2rnn`: the M²RNN recurrence's Triton kernels (kernels/triton_m2rnn.py) against the PyTorch
loop (m2rnn_checkpointed: what the mixer runs off CUDA, a state kept per 32 steps), forward and
forward+backward, on the presets' M²RNN head shapes at their micro-batch and length.

The two paths alternate round by round; each time is printed as the minimum / median over --rounds, the
ratio is the loop's median over the kernels'. max err: the largest |Triton − loop| over y (fwd), or over y,
h_last and the six gradients (fwd+bwd), each relative to the loop's largest |value|. Without CUDA only the
loop runs (the kernels' interpreter would time Python, not the kernels).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from unroll.kernels.m2rnn_scan import m2rnn_checkpointed
from unroll.launch.bench import harness

Shape = tuple[int, int, int, int, int, int]  # batch, length, q/k heads G, value heads H, K, V
GRIDS: dict[str, list[Shape]] = {
    "gpu": [
        (8, 4096, 1, 88, 64, 16),  # m2rnn-hybrid-400m's layer at its micro-batch 8
        (2, 4096, 1, 132, 64, 16),  # m2rnn-moe-7b's layer at its micro-batch 2
        (16, 128, 1, 16, 32, 16),  # tiny-m2rnn's layer
    ],
    "quick": [(2, 64, 1, 4, 16, 8)],
}

Solve = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Row:
    batch: int
    length: int
    qk_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    pass_: str  # fwd | fwd+bwd
    torch_ms: float  # median over the rounds
    torch_min_ms: float
    triton_ms: float | None  # None without CUDA
    triton_min_ms: float | None
    max_err: float | None  # Triton vs the loop (see the module docstring)


def inputs(B: int, T: int, G: int, H: int, K: int, V: int, device: torch.device) -> list[torch.Tensor]:
    """q, k, v, f, W, h0 in float32, scaled as in training (tanh neither linear nor saturated), leaves."""
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(B, T, G, K, generator=g) / K**0.5,
        torch.randn(B, T, G, K, generator=g) / K**0.5,
        torch.randn(B, T, H, V, generator=g),
        torch.rand(B, T, H, generator=g) * 0.5 + 0.5,
        torch.eye(V) + 0.1 * torch.randn(H, V, V, generator=g),
        0.1 * torch.randn(B, H, K, V, generator=g),
    ]
    return [x.to(device).requires_grad_() for x in xs]


def run(solve: Solve, xs: list[torch.Tensor], backward: bool) -> list[torch.Tensor]:
    """[y, h_last] forward, or [y, h_last, and the six gradients of their sum]."""
    if not backward:
        with torch.no_grad():
            return list(solve(*xs))
    y, h = solve(*xs)
    grads = torch.autograd.grad(y.sum() + h.sum(), xs)
    return [y.detach(), h.detach(), *grads]


def max_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, want))


def bench_case(shape: Shape, device: torch.device, triton: Solve | None, rounds: int) -> list[Row]:
    xs = inputs(*shape, device=device)
    rows = []
    for backward in (False, True):
        paths = {"torch": lambda: run(m2rnn_checkpointed, xs, backward)}
        if triton is not None:
            paths["triton"] = lambda: run(triton, xs, backward)
        t = harness.alternate(paths, device, rounds)
        err = max_error(run(triton, xs, backward), run(m2rnn_checkpointed, xs, backward)) if triton else None
        tri = t.get("triton")
        rows.append(
            Row(
                *shape,
                "fwd+bwd" if backward else "fwd",
                t["torch"].median * 1e3,
                t["torch"].min * 1e3,
                tri.median * 1e3 if tri else None,
                tri.min * 1e3 if tri else None,
                err,
            )
        )
    return rows


def format_row(r: Row) -> str:
    loop = f"{r.torch_min_ms:.2f}/{r.torch_ms:.2f}"
    if r.triton_ms is None or r.triton_min_ms is None:
        tri = f"{'n/a':>17} {'':>7} {'':>8}"
    else:
        tri = (
            f"{r.triton_min_ms:.2f}/{r.triton_ms:.2f}".rjust(17) + f" {r.torch_ms / r.triton_ms:6.1f}x {r.max_err:8.1e}"
        )
    shape = f"{r.batch}x{r.length} G{r.qk_heads} H{r.v_heads} K{r.k_dim} V{r.v_dim}"
    return f"{shape:28} {r.pass_:8} {loop:>17} {tri}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench m2rnn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=sorted(GRIDS), default=None, help="default: gpu on CUDA, quick otherwise")
    harness.add_arguments(p)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    triton = None
    if device.type == "cuda":
        from unroll.kernels.triton_m2rnn import m2rnn_triton

        triton = m2rnn_triton
    rows: list[Row] = []
    with harness.session(args.threads, prog="unroll bench m2rnn"):
        print(
            f"M²RNN recurrence, float32, {args.device}; ms = min/median over {args.rounds} rounds, the paths "
            f"alternating; ratio = the loop's median over the Triton kernels'"
        )
        print(f"{'B x T, heads, K, V':28} {'pass':8} {'loop ms':>17} {'triton ms':>17} {'ratio':>7} {'max err':>8}")
        for shape in GRIDS[args.grid or ("gpu" if device.type == "cuda" else "quick")]:
            for row in bench_case(shape, device, triton, args.rounds):
                rows.append(row)
                print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0
