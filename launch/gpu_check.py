"""`make gpu-check` (`python -m unroll.launch.gpu_check`): the first thing to run on a machine with a CUDA GPU,
within 8 minutes on one H100 (--budget-s): the CUDA tests, `unroll bench solver` up to T = 131072, `unroll
bench throughput` of the tiny presets and of paragru-1b in bf16 with its MFU, the M²RNN Triton kernels
against the PyTorch loop, and TNT against Titans (the parts and their sizes: launch/gpu_check_parts.py).

GPU time is scarce, so one part failing, crashing or hanging does not stop the rest: each part is a
subprocess in a session of its own, with its own time limit (cut to what is left of --budget-s; a part that
would start with less than MIN_START_S left is skipped), its output in OUT/PART.log and its figures read
from the bench's --json (pytest's --junitxml for the tests). At the end one table goes to stdout (and
OUT/gpu-check.txt): per part its status, seconds and key figures, and for a failed part the reason and its
log's last lines; every figure goes to OUT/gpu-check.json. Exit 0 when every part passed, 1 otherwise (a part
skipped for time counts as not passed; parts skipped for --device cpu do not), 2 when no CUDA is there.

--device cpu checks the plumbing on a machine without a GPU: the parts that need CUDA are skipped, the rest
run at --quick sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unroll.launch.gpu_check_parts import PARTS, ROOT, Part, Sizes

BUDGET_S = 480.0  # the 8 minutes on an H100
MIN_START_S = 10.0  # a part started with less would spend it importing torch
TAIL_LINES = 30  # of a failed part's log, into the JSON (the table shows the last TABLE_TAIL)
TABLE_TAIL = 3
NO_CUDA = "needs CUDA (--device cpu)"


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped
    reason: str = ""  # why it failed or was skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    command: list[str] = field(default_factory=list)
    log: str = ""
    summary: str = ""  # the table's figures
    figures: Any = None  # everything the part's figures file held
    tail: list[str] = field(default_factory=list)  # a failed part's last log lines


def _stop(proc: subprocess.Popen) -> None:
    """The part's whole process group (pytest's workers, compile workers): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, n: int) -> list[str]:
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-n:]


def run_part(part: Part, sizes: Sizes, log: Path, limit_s: float) -> Outcome:
    sizes.figures.unlink(missing_ok=True)  # a figures file from an earlier run must not pass for this one's
    cmd = [sys.executable, *part.args(sizes)]
    start = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),  # the log is current when a time limit cuts the part
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that _stop reaches its children too
        )
        try:
            rc = proc.wait(timeout=limit_s)
            reason = "" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            _stop(proc)
            reason = f"timed out after {limit_s:.0f} s"
        except BaseException:  # Ctrl-C: leave nothing of it running on the GPU
            _stop(proc)
            raise
    o = Outcome(part.name, "failed" if reason else "passed", reason, time.monotonic() - start, limit_s, cmd, str(log))
    if sizes.figures.exists():
        try:
            o.summary, o.figures = part.summarize(sizes.figures)
        except Exception as e:  # noqa: BLE001 - a bench's output format changed: say so, go on
            o.status, o.reason = "failed", o.reason or f"figures unreadable ({type(e).__name__}: {e})"
    elif not reason:
        o.status, o.reason = "failed", f"wrote no {sizes.figures.name}"
    if o.status == "failed":
        o.tail = _tail(log, TAIL_LINES)
    return o


# ------------------------------------------------------------------------------------------ the machine


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def machine() -> dict[str, Any]:
    """What the figures were measured on. CUDA is asked only whether it is there: the parent holds no context
    (memory) on the GPU the parts share."""
    import importlib.metadata

    import torch

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {
        "gpu": _first_line(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None: a CPU build of torch
        "triton": triton,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "commit": _first_line(["git", "rev-parse", "--short", "HEAD"]),
    }


def machine_line(m: dict[str, Any]) -> str:
    cuda = f"CUDA {m['torch_cuda']}" if m["torch_cuda"] else "a CPU build"
    return (
        f"{m['gpu'] or 'no GPU found by nvidia-smi'}; torch {m['torch']} ({cuda}), triton {m['triton']}, "
        f"{m['cpus']} CPUs, commit {m['commit']}"
    )


# ------------------------------------------------------------------------------------------ the table


def format_table(outcomes: list[Outcome], total_s: float, budget_s: float, json_path: Path) -> str:
    lines = [f"{'part':14} {'status':6} {'seconds':>7}  figures"]
    for o in outcomes:
        status = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}[o.status]
        seconds = f"{o.seconds:7.0f}" if o.status != "skipped" else f"{'-':>7}"
        figures = "; ".join(x for x in (o.reason, o.summary) if x)
        lines.append(f"{o.name:14} {status:6} {seconds}  {figures}")
        lines += [f"{'':30}| {line[:150]}" for line in o.tail[-TABLE_TAIL:]]
    n = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    verdict = "pass" if passed(outcomes) else "FAIL"
    lines.append(
        f"{'all':14} {verdict:6} {total_s:7.0f}  {n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped "
        f"(budget {budget_s:.0f} s); logs and figures in {json_path.parent}, all figures in {json_path.name}"
    )
    return "\n".join(lines)


def passed(outcomes: list[Outcome]) -> bool:
    return all(o.status == "passed" or o.reason == NO_CUDA for o in outcomes)


def main(argv: list[str] | None = None) -> int:
    names = [p.name for p in PARTS]
    p = argparse.ArgumentParser(
        prog="python -m unroll.launch.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parts, in order (limit at full size):\n"
        + "\n".join(f"  {x.name:14} {x.what} ({x.timeout_s} s)" for x in PARTS),
    )
    p.add_argument("--out", default="runs/gpu-check", help="logs, figures, gpu-check.json (default %(default)s)")
    p.add_argument("--parts", default=",".join(names), help="comma-separated subset, run in the listed order")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing, not the figures")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: CUDA parts skipped, --quick")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="for all parts together (default %(default)g)")
    args = p.parse_args(argv)
    chosen = args.parts.split(",")
    if unknown := [x for x in chosen if x not in names]:
        p.error(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(names)}")
    parts = [x for x in PARTS if x.name in chosen]
    m = machine()
    print(f"gpu-check: {machine_line(m)}", flush=True)
    if args.device == "cuda" and not m["cuda_available"]:
        why = "this torch is a CPU build" if not m["torch_cuda"] else "torch finds no CUDA device"
        print(
            f"gpu-check: no CUDA GPU ({why}); a GPU machine needs the CUDA build of torch (README, GPU clusters); "
            "--device cpu checks the plumbing here",
            file=sys.stderr,
        )
        return 2
    quick = args.quick or args.device == "cpu"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    outcomes = []
    for i, part in enumerate(parts, 1):
        left = args.budget_s - (time.monotonic() - start)
        skip = NO_CUDA if part.needs_cuda and args.device != "cuda" else ""
        if not skip and left < MIN_START_S:
            skip = f"not started: {max(left, 0):.0f} s of the budget left"
        if skip:
            print(f"[{i}/{len(parts)}] {part.name}: skipped, {skip}", flush=True)
            outcomes.append(Outcome(part.name, "skipped", skip))
            continue
        limit = min(float(part.timeout_s), left)
        print(f"[{i}/{len(parts)}] {part.name}: {part.what} (limit {limit:.0f} s)", flush=True)
        sizes = Sizes(args.device, quick, out / f"{part.name}{part.suffix}")
        o = run_part(part, sizes, out / f"{part.name}.log", limit)
        print(f"[{i}/{len(parts)}] {part.name}: {o.status} in {o.seconds:.0f} s {o.reason}".rstrip(), flush=True)
        outcomes.append(o)
    total = time.monotonic() - start
    json_path = out / "gpu-check.json"
    table = format_table(outcomes, total, args.budget_s, json_path)
    print(table)
    (out / "gpu-check.txt").write_text(f"gpu-check: {machine_line(m)}\n{table}\n")
    report = {
        "started": started,
        "machine": m,
        "device": args.device,
        "quick": quick,
        "budget_s": args.budget_s,
        "seconds": total,
        "passed": passed(outcomes),
        "parts": [asdict(o) for o in outcomes],
    }
    json_path.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
