"""`unroll launch local CONFIG --nproc N [key=value ...]`: `unroll train` under torchrun on this machine,
with the failure and logging policy SLURM launches share (torchrun_flags)."""
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
# Console lines from a rank carry its global rank (torchrun's default is the local one).
PREFIX_ENV = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:"}


def torchrun_flags(log_dir: str, shutdown_timeout: int) -> list[str]:
    """No restarts: a rank that fails (or a collective that times out, run.collective_timeout_s) ends the
    job, and a new launch resumes from the newest checkpoint. A forwarded signal leaves the ranks
    `shutdown_timeout` seconds to checkpoint before SIGKILL. Every rank's stdout and stderr go to
    LOG_DIR/<run id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log; local rank 0's are also
    copied to the console (the trainer prints only from global rank 0)."""
    return ["--max-restarts", "0", "--signals-to-handle", FORWARDED_SIGNALS,
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
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, run nothing")
    return p


def main(argv: list[str]) -> int:
    from unroll.train.config import ConfigError, load_config

    args = parser().parse_intermixed_args(argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    cfg = load_config(args.config, args.overrides)  # a bad key stops here, before any process starts
    log_dir = args.log_dir or str(Path(cfg.run.dir) / "logs" / f"local-{time.strftime('%Y%m%d-%H%M%S')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           *torchrun_flags(log_dir, args.shutdown_timeout), *train_args(args.config, args.overrides)]
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    print(f"per-rank logs: {log_dir}/*/attempt_0/<rank>/stdout.log, stderr.log", flush=True)
    # exec: Ctrl-C and other signals reach torchrun's agent directly, which forwards them to the ranks.
    os.execve(sys.executable, cmd, dict(os.environ, **PREFIX_ENV))
