"""`unroll check kernels` (`python -m unroll.launch.triton_aot`): every Triton kernel the project launches,
compiled to a cubin for a CUDA architecture (default sm_90, an H100/H200) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, where the tests run the kernels on a CPU) executes the kernels' Python,
not Triton's compiler, so a kernel can pass every CPU test and still fail to compile on a GPU: a type the
compiler infers differently, an op the interpreter allows and the code generator does not, a tile that needs
more shared memory than the GPU has. GPU time is scarce, so this finds those on the CPU:

1. a subprocess runs each launcher (the Triton scans, the fused Newton solve and its adjoint for ParaGRU and
   ParaLSTM, the M²RNN forward and backward) on small CPU tensors in the interpreter, in float32 and float64,
   with resets and initial states, and at the sizes where the launchers pick their production tile constants;
   every launch's specialization (argument types, constexprs, alignment) is recorded by Triton's own binder for
   the target, exactly as a launch on that GPU would compute it;
2. this process (Triton imported without the interpreter) compiles each distinct record through Triton's real
   pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for the target, and prints one row per kernel: its shared memory
   against the architecture's limit, warps, and cubin size. Exit 1 if any fails to compile or exceeds the
   shared memory limit.

What this cannot see: a wrong answer on the GPU, register spills' cost, or the speed; `make gpu-check` is for
those.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Shared memory per block, opt-in maximum, by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


@dataclass(frozen=True)
class FnRef:
    """A @triton.jit function by module and qualified name (a constexpr argument such as a cell's code)."""

    module: str
    qualname: str

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


@dataclass
class Compiled:
    kernel: str  # module:qualname
    case: str  # which launcher call recorded it
    constexprs: str
    ok: bool
    shared: int = 0
    num_warps: int = 0
    cubin_bytes: int = 0
    seconds: float = 0.0
    error: str = ""


# --------------------------------------------------------------------------------------------- recording


def _record(out: Path, arch: int, extra: list[str], builtin: bool) -> None:
    """Phase 1, in a process whose Triton runs the interpreter: run every launcher, record each launch."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    records: list[dict[str, Any]] = []
    case = ["?"]
    original_run = InterpretedFunction.run

    def encode(value: Any) -> Any:
        # as plain data: this process runs as __main__, so a FnRef would unpickle only where __main__ is this module
        if isinstance(value, InterpretedFunction):
            return {"jit_function": [value.fn.__module__, value.fn.__qualname__]}
        return value

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        # Triton's binder for the target: the specialization a launch on that GPU computes from these arguments
        jit = JITFunction(self.fn)
        bound, specialization, options = create_function_from_signature(jit.signature, jit.params, backend)(
            *args, **kwargs
        )
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        records.append(
            dict(
                module=self.fn.__module__,
                qualname=self.fn.__qualname__,
                case=case[0],
                signature=signature,
                constexprs={k: encode(v) for k, v in constexprs.items()},
                attrs=attrs,
                options=options.__dict__,
            )
        )
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    cases = _cases(torch) if builtin else []
    for module in extra:  # a module with cases(torch) -> [(name, call)], e.g. your own fused cell's launches
        cases += importlib.import_module(module).cases(torch)
    InterpretedFunction.run = run  # type: ignore[method-assign]
    try:
        for name, launch in cases:
            case[0] = name
            launch()
    finally:
        InterpretedFunction.run = original_run  # type: ignore[method-assign]
    out.write_bytes(pickle.dumps(records))


def _cases(torch: Any) -> list[tuple[str, Any]]:
    """(name, call) for every launcher, each in float32 and float64; the sizes reach the launchers' production
    tile constants (the fused Newton's 64-step chunks and 32-channel blocks, the diagonal scan's 128-step
    chunks from T = 4097, M²RNN's 64 × 16 heads) while staying quick in the interpreter."""
    from unroll.kernels.fused_newton import fused_newton_solve
    from unroll.kernels.triton_m2rnn import m2rnn_triton
    from unroll.kernels.triton_scan import scan_triton
    from unroll.models.paragru import ParaGRUCell
    from unroll.models.paralstm import ParaLSTMCell

    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: Any, scale: float = 1.0) -> Any:
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5) * 2 * scale).to(dtype)

    def scan(block: bool, B: int, T: int, D: int, dtype: Any) -> None:
        k = (2,) if block else ()
        a = rand(B, T, D, *k, *k, dtype=dtype, scale=0.5)
        scan_triton(a, rand(B, T, D, *k, dtype=dtype), rand(B, D, *k, dtype=dtype), block)

    def newton(lstm: bool, dtype: Any) -> None:
        B, T, D = 1, 70, 32  # two chunks of 64 steps, a block of 32 channels
        params = [rand(3, D, dtype=dtype, scale=0.5)] + ([rand(2, D, dtype=dtype, scale=0.5)] if lstm else [])
        params = [p.requires_grad_() for p in params]
        cell = ParaLSTMCell(*params) if lstm else ParaGRUCell(*params)
        u = rand(B, T, 3, D, dtype=dtype).requires_grad_()
        h0 = rand(B, D, *([2] if lstm else []), dtype=dtype).requires_grad_()
        resets = torch.rand(B, T, generator=g) < 0.05
        h, _ = fused_newton_solve(cell, u, h0, resets=resets)
        h.sum().backward()  # the fused adjoint

    def m2rnn(dtype: Any, clip: float | None) -> None:
        B, T, G, K, H, V = 1, 40, 1, 64, 2, 16
        q, k = rand(B, T, G, K, dtype=dtype), rand(B, T, G, K, dtype=dtype)
        v, f = rand(B, T, H, V, dtype=dtype), torch.rand(B, T, H, generator=g, dtype=torch.float64).to(dtype)
        W = rand(H, V, V, dtype=dtype, scale=0.3)
        for x in (q, k, v, f, W):
            x.requires_grad_()
        h0 = rand(B, H, K, V, dtype=dtype).requires_grad_()
        resets = torch.rand(B, T, generator=g) < 0.1
        y, h_last = m2rnn_triton(q, k, v, f, W, h0, resets, chunk=16, clip=clip)
        (y.sum() + h_last.sum()).backward()

    cases: list[tuple[str, Any]] = []
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        cases += [
            (f"scan diag {name} T=300", lambda d=dtype: scan(False, 2, 300, 8, d)),
            (f"scan 2x2 {name} T=300", lambda d=dtype: scan(True, 2, 300, 8, d)),
            (f"fused newton ParaGRU {name}", lambda d=dtype: newton(False, d)),
            (f"fused newton ParaLSTM {name}", lambda d=dtype: newton(True, d)),
            (f"m2rnn {name}", lambda d=dtype: m2rnn(d, None)),
            (f"m2rnn {name} state_grad_clip", lambda d=dtype: m2rnn(d, 1.0)),
        ]
    cases.append(("scan diag float32 T=4097", lambda: scan(False, 1, 4097, 4, torch.float32)))
    return cases


# --------------------------------------------------------------------------------------------- compiling


def _decode(value: Any) -> Any:
    """A recorded constexpr: a @triton.jit function (recorded by module and name) resolved, else as recorded."""
    if isinstance(value, dict) and "jit_function" in value:
        return FnRef(*value["jit_function"]).resolve()
    return value


def _compile(records: list[dict[str, Any]], arch: int) -> list[Compiled]:
    """Phase 2, Triton without the interpreter: each distinct launch through the real compiler."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen: set[str] = set()
    results = []
    for r in records:
        key = repr((r["module"], r["qualname"], r["signature"], r["constexprs"], r["attrs"], r["options"]))
        if key in seen:
            continue
        seen.add(key)
        constexprs = {k: _decode(v) for k, v in r["constexprs"].items()}
        shown = ", ".join(
            f"{name}={getattr(constexprs[(i,)], '__name__', constexprs[(i,)])}"
            for i, name in enumerate(r["signature"])
            if (i,) in constexprs
        )
        row = Compiled(f"{r['module']}:{r['qualname']}", r["case"], shown, ok=False)
        start = time.perf_counter()
        try:
            jit = FnRef(r["module"], r["qualname"]).resolve()
            source = ASTSource(jit, r["signature"], constexprs, r["attrs"])
            kernel = triton.compile(source, target=target, options=r["options"])
            row.shared, row.num_warps = int(kernel.metadata.shared), int(kernel.metadata.num_warps)
            row.cubin_bytes, row.ok = len(kernel.asm["cubin"]), True
        except Exception as e:  # noqa: BLE001 — every kernel is tried; the failure is the result
            row.error = "".join(traceback.format_exception_only(type(e), e)).strip()
        row.seconds = time.perf_counter() - start
        results.append(row)
    return results


def _over_limit(row: Compiled, arch: int) -> bool:
    limit = SHARED_LIMIT.get(arch)
    return limit is not None and row.shared > limit


def format_table(rows: list[Compiled], arch: int) -> str:
    head = f"{'kernel':48} {'recorded by':34} {'shared B':>9} {'warps':>5} {'cubin B':>8} {'s':>5}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        over = _over_limit(r, arch)
        result = "ok" if r.ok and not over else ("shared memory over the limit" if r.ok else r.error.splitlines()[-1])
        lines.append(
            f"{r.kernel.split('.')[-1]:48} {r.case:34} {r.shared:9d} {r.num_warps:5d} {r.cubin_bytes:8d} "
            f"{r.seconds:5.1f}  {result}"
        )
        if r.constexprs:
            lines.append(f"{'':48}   {r.constexprs}")
    return "\n".join(lines)


def failures(rows: list[Compiled], arch: int) -> list[Compiled]:
    return [r for r in rows if not r.ok or _over_limit(r, arch)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll check kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability ×10: 90 (H100/H200), 80 (A100), ...")
    p.add_argument("--json", default=None, help="also write every row here")
    p.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="MODULE",
        help="also the launches of MODULE.cases(torch) -> [(name, call)] (importable: e.g. your own fused cell's "
        "kernels); repeatable",
    )
    p.add_argument("--no-builtin", action="store_true", help="only the --cases launches, not the project's")
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)  # phase 1, run by phase 2 as a subprocess
    args = p.parse_args(argv)
    if args.record:
        _record(Path(args.record), args.arch, args.cases, not args.no_builtin)
        return 0
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unroll check kernels: triton is already imported in interpreter mode in this process")
    os.environ["TRITON_INTERPRET"] = "0"  # phase 2 compiles; Triton reads this when it is imported
    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "launches.pkl"
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "unroll.launch.triton_aot", "--arch", str(args.arch), "--record", str(recorded)]
        cmd += [f"--cases={m}" for m in args.cases] + (["--no-builtin"] if args.no_builtin else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"unroll check kernels: running the launchers in the interpreter failed (exit {proc.returncode})")
            return 1
        records = pickle.loads(recorded.read_bytes())
    rows = _compile(records, args.arch)
    print(f"Triton kernels compiled for sm_{args.arch} ({len(records)} launches recorded, {len(rows)} distinct):")
    print(format_table(rows, args.arch))
    bad = failures(rows, args.arch)
    limit = SHARED_LIMIT.get(args.arch)
    print(
        f"{len(rows) - len(bad)} of {len(rows)} compiled"
        + (f" within sm_{args.arch}'s {limit} bytes of shared memory" if limit else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
