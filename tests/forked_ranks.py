"""N gloo ranks forked from one warm process, for the tests that compare layouts: what torchrun's rendezvous
environment gives a rank, without torchrun's agent and without each rank importing torch and unroll anew.

Every rank of every torchrun start spends seconds of CPU importing (torch, torch.distributed.tensor, unroll), and
the multi-process tests start about a hundred ranks. Here a forkserver imports those modules once (it runs no
torch op, so it holds no OpenMP or gloo threads a fork could break) and forks each rank from itself; the rank
sets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) and runs `python -m
unroll.launch.cli ARGS` or a worker script as torchrun would. Launchers themselves (torchrun, `unroll launch
local`, SLURM) keep their own tests, which start real processes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from unroll.launch.torchrun import TorchrunError, run_torchrun

PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.fsdp", "unroll.launch.cli", "unroll.train.trainer"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(args: list[str], env: dict, rank: int, logs: str) -> None:
    """One rank: torchrun's environment, its output to LOGS/rank{r}.out|.err (file descriptors, so that what
    C++ prints is there too), then `args` run as the rank's program."""
    os.environ.clear()
    os.environ.update(env)
    for stream, name in ((1, "out"), (2, "err")):
        fd = os.open(os.path.join(logs, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, stream)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if env.get("PYTHONFAULTHANDLER"):
        import faulthandler

        faulthandler.enable()
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # torch read it in the forkserver, not here
    code = 0
    try:
        if args[0] == "-m" and args[1] == "unroll.launch.cli":
            from unroll.launch.cli import main

            sys.argv = ["unroll", *args[2:]]
            code = main(args[2:]) or 0
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_forked(args: list[str], nproc: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` with ranks forked from the warm forkserver: the ranks'
    output joined in rank order, exit status that of the first rank that failed (0 when all succeeded). With a
    PYTHONPATH of its own, `env` asks for what only a fresh interpreter does: then torchrun runs it.
    TorchrunError when the ranks do not finish within `timeout` seconds (all of them are killed first)."""
    if env.get("PYTHONPATH") != os.environ.get("PYTHONPATH"):
        # a path (a sitecustomize hook, say) that must act when the interpreter starts: real processes
        return run_torchrun(args, nproc, env, timeout)
    ctx = _forkserver()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        procs = []
        for r in range(nproc):
            rank_env = dict(
                env,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                GROUP_RANK="0",
                ROLE_RANK=str(r),
                ROLE_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                TORCHELASTIC_RESTART_COUNT="0",
                TORCHELASTIC_MAX_RESTARTS="0",
            )
            p = ctx.Process(target=_rank, args=(list(args), rank_env, r, logs), name=f"rank{r}")
            p.start()
            procs.append(p)
        timed_out, code = _wait(procs, timeout)
        out, err = (_joined(logs, nproc, name) for name in ("out", "err"))
    if timed_out:
        raise TorchrunError(f"the {nproc}-rank run timed out after {timeout:g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(["forked", *map(str, args)], code, out, err)


def _joined(logs: str, nproc: int, name: str) -> str:
    files = [Path(logs, f"rank{r}.{name}") for r in range(nproc)]
    return "".join(f.read_text(errors="replace") for f in files if f.exists())


def _wait(procs: list, timeout: float) -> tuple[bool, int]:
    """Waits for every rank; as torchrun's agent does, once one fails the others are stopped (they would wait in
    a collective for it). (whether the ranks were still running after `timeout` seconds and were killed, the
    exit status of the first rank that failed or 0)."""
    deadline = time.monotonic() + timeout
    running, failed = list(procs), []
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=left)
        running = [p for p in running if p.is_alive()]
        failed = [p.exitcode for p in procs if not p.is_alive() and p.exitcode]
        if failed:
            break
    for p in running:
        p.kill()
    for p in procs:
        p.join()
    return bool(running) and not failed, failed[0] if failed else 0
