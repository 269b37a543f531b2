"""Running a command under `torchrun --standalone` on this machine and collecting per-rank results: used
by the benchmarks that launch their own ranks and by the multi-process tests.

`python -m unroll.launch.torchrun ARGS` is torchrun itself (`torch.distributed.run`, same options) whose
agent, when a signal stops it (it forwards the signal to the ranks, which checkpoint and stop), exits
128 + the signal's number with one line instead of torchrun's traceback: `unroll launch local` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn


class TorchrunError(RuntimeError):
    """The ranks timed out, failed, or wrote no result; the message carries torchrun's stderr tail."""


def run_torchrun(args: list[str], nproc: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS`, output captured. On a timeout torchrun is asked to
    stop its workers (SIGTERM: they run in sessions of their own, so only its agent reaches them), then
    killed, and TorchrunError is raised: no rank is left waiting in a collective."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise TorchrunError(f"the {nproc}-rank run timed out after {timeout:g} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def rank_results(out: Path, nproc: int, proc: subprocess.CompletedProcess) -> list[dict]:
    """Each rank's OUT/rank{r}.json, in rank order; TorchrunError where one is missing or holds
    {"error": traceback}."""
    results = []
    for r in range(nproc):
        path = Path(out) / f"rank{r}.json"
        if not path.exists():
            raise TorchrunError(f"rank {r} wrote no result (torchrun exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(path.read_text())
        if "error" in res:
            raise TorchrunError(f"rank {r} failed:\n{res['error']}")
        results.append(res)
    return results


def finish_rank(out: str | Path, rank: int, result: dict) -> NoReturn:
    """The end of a rank that rank_results reads: writes OUT/rank{rank}.json (`result`, or {"error":
    traceback}) and leaves. After an error it exits 1 at once (its peers may never reach a barrier);
    otherwise it waits at a barrier and exits 0. os._exit skips the interpreter's teardown, where gloo
    ranks were seen to abort after finishing their work."""
    import torch.distributed as dist

    with open(Path(out) / f"rank{rank}.json", "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if "error" in result:
        sys.stderr.write(result["error"])
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str]) -> int:
    """torchrun ARGV; a stopping signal ends it with 128 + its number (a failed rank: torchrun's own error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        print(
            f"torchrun: stopped by {e.sigval.name} (handed to the ranks: checkpoint and stop)",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
