"""`unroll launch local CONFIG --nproc N [--max-restarts R] [key=value ...]`: `unroll train` under torchrun
on this machine, with the failure, restart and logging policy SLURM launches share (torchrun_flags).

In-job restarts (`--max-restarts R`, default 0) are torchrun's elastic agent's own: when any rank exits
non-zero (an exception, a crash, SIGKILL, a collective that timed out) the agent stops the others (SIGTERM,
SIGKILL 30 s later), forms the rendezvous again and starts every rank afresh, up to R times; the new ranks
resume from the newest good checkpoint in RUN_DIR/checkpoints (a `.tmp` save the failure cut short is
skipped, and removed by the next save). A signal the agent forwards (`--signals-to-handle`) is not a
failure: the agent shuts down instead of restarting, so SIGTERM/SIGINT/SIGUSR1 still mean checkpoint and
stop. torchrun tells the ranks the attempt in TORCHELASTIC_RESTART_COUNT; the trainer's first line shows it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

# torchrun's agent turns these into a shutdown that forwards the signal to every rank; SIGUSR1 is the
# preemption warning (train/signals.py: checkpoint and stop, never escalates).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun's environment (local: exec'd with it; SLURM: the batch script exports it).
TORCHRUN_ENV = {
    # Console lines from a rank carry its global rank (torchrun's default is the local one).
    "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:",
    # Every attempt's rank 0 hosts a fresh store for init_process_group. The store the agent shares by
    # default outlives a restart with the failed attempt's keys under the same names: a restarted rank
    # could read a dead peer's gloo address and time out connecting to it.
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
}


def torchrun_flags(log_dir: str, shutdown_timeout: int, max_restarts: int) -> list[str]:
    """A rank that fails (or a collective that times out, run.collective_timeout_s) restarts every rank
    up to `max_restarts` times, then ends the job; a new launch resumes from the newest checkpoint too. A
    forwarded signal leaves the ranks `shutdown_timeout` seconds to checkpoint before SIGKILL. Every
    rank's stdout and stderr go to LOG_DIR/<run id>_<random>/attempt_<restart>/<local rank>/{stdout,stderr}.log;
    local rank 0's are also copied to the console (the trainer prints only from global rank 0)."""
    return ["--max-restarts", str(max_restarts), "--signals-to-handle", FORWARDED_SIGNALS,
            "--shutdown-timeout", str(shutdown_timeout), "--log-dir", log_dir,
            "--redirects", "3", "--tee", "3", "--local-ranks-filter", "0"]


def train_args(config: str, overrides: list[str]) -> list[str]:
    return ["-m", "unroll.launch.cli", "train", config, *overrides]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unroll launch local", description=__doc__)
    p.add_argument("config", help="a YAML config file or a preset name (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this machine")
    p.add_argument("--log-dir", default=None, help="per-rank logs; default RUN_DIR/logs/local-<time>")
    p.add_argument("--shutdown-timeout", type=int, default=60,
                   help="seconds the ranks get to checkpoint after a signal before SIGKILL (default 60)")
    p.add_argument("--max-restarts", type=int, default=0, help="times torchrun restarts every rank after one "
                   "fails, resuming from the newest checkpoint, before the job fails (default 0)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, run nothing")
    return p


def main(argv: list[str]) -> int:
    from unroll.train.config import ConfigError, load_config

    args = parser().parse_intermixed_args(argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    cfg = load_config(args.config, args.overrides)  # a bad key stops here, before any process starts
    log_dir = args.log_dir or str(Path(cfg.run.dir) / "logs" / f"local-{time.strftime('%Y%m%d-%H%M%S')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           *torchrun_flags(log_dir, args.shutdown_timeout, args.max_restarts), *train_args(args.config, args.overrides)]
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    print(f"per-rank logs: {log_dir}/*/attempt_<restart>/<rank>/stdout.log, stderr.log", flush=True)
    # exec: Ctrl-C and other signals reach torchrun's agent directly, which forwards them to the ranks.
    os.execve(sys.executable, cmd, dict(os.environ, **TORCHRUN_ENV))
