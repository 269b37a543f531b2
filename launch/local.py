"""`unroll launch local CONFIG --nproc N [--max-restarts R] [key=value ...]`: `unroll train` under torchrun
on this machine, with the failure, restart and logging policy SLURM launches share (torchrun_flags).

In-job restarts (`--max-restarts R`, default 0) are torchrun's elastic agent's own: when any rank exits
non-zero (an exception, a crash, SIGKILL, a collective that timed out) the agent stops the others (SIGTERM,
SIGKILL 30 s later), forms the rendezvous again and starts every rank afresh, up to R times; the new ranks
resume from the newest good checkpoint in RUN_DIR/checkpoints (a `.tmp` save the failure cut short is
skipped, and removed by the next save). A signal the agent forwards (`--signals-to-handle`) is not a
failure: the agent shuts down instead of restarting, so SIGTERM/SIGINT/SIGUSR1 still mean checkpoint and
stop. torchrun tells the ranks the attempt in TORCHELASTIC_RESTART_COUNT; the trainer's first line shows it.

Before torchrun starts, every check that needs no process group runs here (train/preflight.py: layout,
batch and micro-batches, pipeline schedule, data files): a mistake is one line naming the key, exit 2.

Ctrl-C (and SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 sent to this launcher): torchrun runs in a session of its
own, so the terminal's Ctrl-C reaches only this process, which hands the signal once to torchrun's agent;
the agent gives it to the ranks, which checkpoint and stop (or are killed after --shutdown-timeout).
Once they have, this prints `unroll launch: interrupted` and exits 128 + the signal (130 for Ctrl-C). A
repeated Ctrl-C is not passed on: it would cut short the agent's wait for the ranks' checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# torchrun's agent turns these into a shutdown that forwards the signal to every rank; SIGUSR1 is the
# preemption warning (train/signals.py: checkpoint and stop, never escalates).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun's environment (local: started with it; SLURM: the batch script exports it).
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
    return [
        "--max-restarts",
        str(max_restarts),
        "--signals-to-handle",
        FORWARDED_SIGNALS,
        "--shutdown-timeout",
        str(shutdown_timeout),
        "--log-dir",
        log_dir,
        "--redirects",
        "3",
        "--tee",
        "3",
        "--local-ranks-filter",
        "0",
    ]


def train_args(config: str, overrides: list[str]) -> list[str]:
    return ["-m", "unroll.launch.cli", "train", config, *overrides]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unroll launch local", description=__doc__)
    p.add_argument("config", help="a YAML config file or a preset name (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this machine")
    p.add_argument("--log-dir", default=None, help="per-rank logs; default RUN_DIR/logs/local-<time>")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=60,
        help="seconds the ranks get to checkpoint after a signal before SIGKILL (default 60)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="times torchrun restarts every rank after one "
        "fails, resuming from the newest checkpoint, before the job fails (default 0)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, run nothing")
    return p


def main(argv: list[str]) -> int:
    from unroll.train.config import ConfigError, load_config
    from unroll.train.preflight import preflight

    args = parser().parse_intermixed_args(argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    cfg = load_config(args.config, args.overrides)  # a bad key stops here, before any process starts
    preflight(cfg, args.nproc)  # and a layout, batch or data mistake
    log_dir = args.log_dir or str(Path(cfg.run.dir) / "logs" / f"local-{time.strftime('%Y%m%d-%H%M%S')}")
    cmd = [
        sys.executable,
        "-m",
        "unroll.launch.torchrun",
        "--standalone",
        "--nproc-per-node",
        str(args.nproc),
        *torchrun_flags(log_dir, args.shutdown_timeout, args.max_restarts),
        *train_args(args.config, args.overrides),
    ]
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    print(f"per-rank logs: {log_dir}/*/attempt_<restart>/<rank>/stdout.log, stderr.log", flush=True)
    return supervise(cmd, dict(os.environ, **TORCHRUN_ENV))


def supervise(cmd: list[str], env: dict) -> int:
    """Runs torchrun's agent (`cmd`) in a session of its own and waits for it, handing it the first signal
    this process gets (module docstring). Returns its exit status, or 128 + the signal after one."""
    relay = _SignalRelay()
    signals = [signal.Signals[name] for name in FORWARDED_SIGNALS.split(",")]
    previous = {sig: signal.signal(sig, relay.received) for sig in signals}
    try:
        relay.agent = subprocess.Popen(cmd, env=env, start_new_session=True)
        relay.hand_on()  # one that came while the agent was starting
        status = relay.agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if relay.signum is None:
        return status
    name = signal.Signals(relay.signum).name
    print(
        "unroll launch: interrupted" if relay.signum == signal.SIGINT else f"unroll launch: stopped by {name}",
        file=sys.stderr,
        flush=True,
    )
    return 128 + relay.signum


class _SignalRelay:
    """The first signal this process gets, handed once to the agent's process group."""

    def __init__(self) -> None:
        self.agent: subprocess.Popen | None = None
        self.signum: int | None = None
        self.handed = False

    def received(self, signum, frame) -> None:
        if self.signum is not None:
            print(
                "unroll launch: still waiting for the ranks to checkpoint and stop (--shutdown-timeout)",
                file=sys.stderr,
                flush=True,
            )
            return
        self.signum = signum
        self.hand_on()

    def hand_on(self) -> None:
        if self.signum is None or self.agent is None or self.handed:
            return
        self.handed = True
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            os.killpg(self.agent.pid, self.signum)
