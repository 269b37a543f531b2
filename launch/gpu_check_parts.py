"""What `make gpu-check` runs (launch/gpu_check.py): each part a command with its sizes, a time limit, and how
its figures file reads as the table's one line.

Sizes are set so that all parts together should take about 6 minutes on one H100 (the budget is 8): the estimates
beside each part are what its work should cost there, from the CPU timings of the same code and the
kernels' launch counts, not yet a measurement; each part's limit is 1.5-3 times its estimate. --quick
(and --device cpu, which implies it) runs every part at a tiny size, to check the plumbing.
"""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout: tests/ lives here
# the Triton tests run on the GPU where one is present (the fused Newton's, for ParaGRU, ParaLSTM and a 3×3 cell)
CUDA_TESTS = [
    "tests/test_cuda.py",
    "tests/test_triton_scan.py",
    "tests/test_m2rnn_kernel.py",
    "tests/test_triton_newton.py",
]
TINY_PRESETS = "tiny-transformer,tiny-gru,tiny-lstm,tiny-m2rnn,tiny-moe"
SOLVER_LOOP_STEPS = 4096  # the loop's steps timed per row (solver.py extrapolates longer sequences per step)


@dataclass(frozen=True)
class Sizes:
    """What a part's command depends on: the device, tiny sizes or not, where its figures go."""

    device: str  # cuda | cpu
    quick: bool
    figures: Path  # the file the part writes its figures to (a bench's --json, pytest's --junitxml)


@dataclass(frozen=True)
class Part:
    name: str
    what: str  # one line for --help
    timeout_s: int  # at full size; the overall budget may cut it shorter
    needs_cuda: bool  # skipped (not failed) with --device cpu
    args: Callable[[Sizes], list[str]]  # the Python interpreter's arguments
    summarize: Callable[[Path], tuple[str, Any]]  # figures file -> (the table's line, the JSON's figures)
    suffix: str = ".json"  # of the figures file


def _bench(name: str, s: Sizes, *args: str) -> list[str]:
    return ["-m", "unroll.launch.cli", "bench", name, "--device", s.device, *args, "--json", str(s.figures)]


def _rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    if not rows:
        raise ValueError(f"{path.name} holds no rows")
    return rows


# ------------------------------------------------------------------------------------------ cuda-tests


def _pytest_args(s: Sizes) -> list[str]:
    files = [str(ROOT / f) for f in (CUDA_TESTS[:1] if s.quick else CUDA_TESTS)]
    quick = ["-k", "solvers or m2rnn_triton"] if s.quick else []
    # the four files side by side on the GPU (pytest-xdist, one process each): the Triton tests' compiles
    # overlap test_cuda.py, whose tests stay in one process, one at a time (its plan tests each measure a
    # 1B-class training step's memory: two at once could crowd an 80 GB GPU)
    workers = ["-n", str(len(files)), "--dist", "loadfile"] if importlib.util.find_spec("xdist") and not s.quick else []
    return ["-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={s.figures}", *workers, *quick, *files]


def _junit(path: Path) -> tuple[str, Any]:
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    assert suite is not None, f"{path.name} holds no testsuite"
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    line = f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
    if failed:
        line += ": " + ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
    return line, {"passed": passed, **n, "failed_tests": failed}


# ------------------------------------------------------------------------------------------ the benches


def _solver_args(s: Sizes) -> list[str]:
    if s.quick:
        return _bench("solver", s, "--grid", "quick", "--cells", "gru", "--rounds", "1", "--sequential-steps", "512")
    return _bench("solver", s, "--grid", "gpu", "--rounds", "3", "--sequential-steps", str(SOLVER_LOOP_STEPS))


def _solver(path: Path) -> tuple[str, Any]:
    rows = _rows(path)
    T = max(r["length"] for r in rows)
    longest = [r for r in rows if r["length"] == T and r["pass_"] == "fwd+bwd"]
    speedups = []
    for r in longest:
        fast = f"triton {r['sequential_ms'] / r['triton_ms']:.1f}x" if r["triton_ms"] else ""
        speedups.append(f"{r['cell']} newton {r['sequential_ms'] / r['newton_ms']:.1f}x {fast}".rstrip())
    steps = min(r["sequential_steps"] for r in longest)
    timed = f" (loop timed on {steps} steps)" if steps < T else ""
    line = (
        f"fwd+bwd at T={T}, speed-up over the loop{timed}: {'; '.join(speedups)}; auto/best worst "
        f"{max(r['auto_slowdown'] for r in rows):.2f}x; max err {max(r['max_err'] for r in rows):.0e}"
    )
    return line, rows


def _throughput_args(s: Sizes) -> list[str]:
    if s.quick:
        sizes = ["--batch", "2", "--seq-len", "32", "--rounds", "1"]
        return _bench("throughput", s, "--presets", "tiny-transformer,tiny-gru", *sizes)
    return _bench("throughput", s, "--presets", TINY_PRESETS, "--rounds", "5")


def _throughput(path: Path) -> tuple[str, Any]:
    rows = _rows(path)
    one = []
    for r in rows:
        tokens = f"{r['tokens_per_s'] / 1e6:.2f}M" if r["tokens_per_s"] >= 1e6 else f"{r['tokens_per_s'] / 1e3:.1f}k"
        one.append(f"{r['preset']} {tokens}" + (f" ({100 * r['mfu']:.1f}%)" if "mfu" in r else ""))
    return "tokens/s (MFU): " + ", ".join(one), rows


def _throughput_1b_args(s: Sizes) -> list[str]:
    # batch 4 × 2048 in bf16 without recompute: `unroll plan` puts it at ~54 GiB (batch 8 would not fit 80)
    batch, seq, rounds = ("1", "256", "1") if s.quick else ("4", "2048", "3")
    sizes = ["--batch", batch, "--seq-len", seq, "--rounds", rounds]
    return _bench("throughput", s, "--presets", "paragru-1b", "--dtype", "bfloat16", *sizes)


def _throughput_1b(path: Path) -> tuple[str, Any]:
    (r,) = _rows(path)
    mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    line = (
        f"{r['preset']} {r['dtype']} {r['batch']}x{r['seq_len']}: {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['tflops_per_gpu']:.0f} TFLOP/s{mfu}, step {r['step_ms']:.0f} ms"
    )
    return line, r


def _m2rnn_args(s: Sizes) -> list[str]:
    return _bench("m2rnn", s, "--grid", "quick", "--rounds", "1") if s.quick else _bench("m2rnn", s, "--rounds", "3")


def _m2rnn(path: Path) -> tuple[str, Any]:
    rows = [r for r in _rows(path) if r["pass_"] == "fwd+bwd"]
    one = []
    for r in rows:
        shape = f"{r['batch']}x{r['length']} H{r['v_heads']}"
        if r["triton_ms"] is None:
            one.append(f"{shape} loop {r['torch_ms']:.1f} ms (no Triton without CUDA)")
        else:
            one.append(f"{shape} {r['torch_ms'] / r['triton_ms']:.0f}x (err {r['max_err']:.0e})")
    return "fwd+bwd, Triton's speed-up over the loop: " + "; ".join(one), rows


def _tnt_args(s: Sizes) -> list[str]:
    if s.quick:
        sizes = ["--batch", "1", "--seq-len", "64", "--d-model", "32", "--heads", "2", "--titans-chunks", "8"]
        return _bench("tnt", s, *sizes, "--global-chunk", "32", "--local-chunk", "8", "--reset", "32", "--rounds", "1")
    return _bench("tnt", s, "--batch", "8", "--seq-len", "2048", "--d-model", "256", "--heads", "4", "--rounds", "3")


def _tnt(path: Path) -> tuple[str, Any]:
    rows = _rows(path)
    others = ", ".join(f"{r['layout']} {r['vs_baseline']:.2f}x" for r in rows[1:])
    return f"tokens/s over {rows[0]['layout']} ({rows[0]['tokens_per_s']:,.0f}): {others}", rows


# In order; the estimates are of each part's time on an H100 at full size (the parts after cuda-tests fit in
# what the budget leaves when it runs to its limit).
PARTS = [
    # ~150 s: test_cuda.py's bf16 training runs, the plans of paragru-1b and m2rnn-hybrid-400m (CPU probes at
    # full width, then real steps) and flex_attention's compile, beside the Triton tests' ~100 kernel compiles
    Part(
        name="cuda-tests",
        what="tests/test_cuda.py, the Triton scan, M²RNN kernel and fused Newton tests",
        timeout_s=240,
        needs_cuda=True,
        args=_pytest_args,
        summarize=_junit,
        suffix=".xml",
    ),
    # ~80 s: per cell 10 loop runs of 18k steps at ~0.1-0.25 ms a step (launch-bound); Newton takes milliseconds
    Part(
        name="solver",
        what=f"bench solver --grid gpu, T up to 131072 (the loop timed on {SOLVER_LOOP_STEPS} steps)",
        timeout_s=150,
        needs_cuda=False,
        args=_solver_args,
        summarize=_solver,
    ),
    # ~20 s: five tiny models, 6 steps each, and the Triton kernels' compile
    Part(
        name="throughput",
        what="bench throughput of the tiny presets, float32",
        timeout_s=60,
        needs_cuda=False,
        args=_throughput_args,
        summarize=_throughput,
    ),
    # ~45 s: paragru-1b built on the GPU, 4 steps of 8k tokens (55 TFLOP each) and the first step's compile
    Part(
        name="throughput-1b",
        what="bench throughput of paragru-1b, bf16 autocast, MFU",
        timeout_s=120,
        needs_cuda=True,
        args=_throughput_1b_args,
        summarize=_throughput_1b,
    ),
    # ~40 s: the loop's 4096 steps fwd+bwd (~1.5 s) × 8 runs per large shape, and four kernel compiles
    Part(
        name="m2rnn",
        what="bench m2rnn: the Triton kernels against the PyTorch loop",
        timeout_s=90,
        needs_cuda=False,
        args=_m2rnn_args,
        summarize=_m2rnn,
    ),
    # ~20 s: 256 sequential chunk steps for Titans C=8, forward and backward, × 4 runs per layout
    Part(
        name="tnt",
        what="bench tnt: a TNT layer against chunkwise Titans",
        timeout_s=60,
        needs_cuda=False,
        args=_tnt_args,
        summarize=_tnt,
    ),
]
