"""`unroll launch slurm CONFIG --nodes N (--gpus-per-node G | --cpu --nproc-per-node P) [key=value ...]`:
checks the run, freezes its config into RUN_DIR/slurm/config.yaml, writes RUN_DIR/slurm/job.sbatch and
submits it with sbatch.

Before anything is written or queued, every check that needs no process group runs here for the job's
N × G ranks (train/preflight.py: layout, batch and micro-batches, pipeline schedule, and the data files,
which `--skip-data-check` leaves to the ranks where this machine does not see them): a mistake is one
line naming the key, exit 2.

The frozen config is what the job, and every requeue of it, trains from: a later launch never changes it
under a queued job. A submission whose resolved config differs from the frozen one is refused, naming
the keys that differ, unless `--replace-config` (then the old one is kept as config.<time>.yaml; only
when no job of this run is queued or running); one that is identical is submitted. `--dry-run` submits
nothing and writes its script and config under RUN_DIR/slurm/dry-run/, leaving RUN_DIR/slurm/ as it is.

Resources: one task per node, given all of the node (`--exclusive`, default; `--no-exclusive` shares the
node and then needs `--cpus-per-task`), all its memory (`--mem 0`, SLURM's "all of each node's memory")
and all its CPUs: `srun --cpus-per-task=$SLURM_CPUS_ON_NODE` (or `--cpus-per-task C`), so the ranks are
not bound to the one CPU a task gets by default.

The job runs one srun task per node; each runs torchrun, which meets the others by c10d rendezvous on
the first node's address (its NodeAddr from `scontrol show node`: several nodes may share a hostname, and
hostnames need not resolve) on a port derived from the job id, and starts one rank per GPU (or P ranks
on CPU, gloo).

Failures: a rank that fails, or a collective that times out (run.collective_timeout_s), makes its node's
torchrun restart its ranks, up to `--max-restarts` times (default 0), without leaving the allocation: the
agent stops its ranks and joins a new round of the same c10d rendezvous (its id holds the requeue count,
not the attempt), where the other nodes' agents follow, theirs failing too or, while still running,
stopped as the rendezvous re-forms; every rank then resumes from the newest good checkpoint. Each
node's agent counts only the failures it saw itself (TORCHELASTIC_RESTART_COUNT, the logs' attempt_N):
a node restarted for another's failure keeps its count and rewrites its attempt_N logs. Once a node's
torchrun has no restarts left it exits non-zero, and srun kills the other nodes (--kill-on-bad-exit).

Preemption: SLURM sends the batch shell SIGUSR1 `--signal-lead` seconds before the time limit
(`--signal=B:USR1@LEAD`; `scancel --batch --signal=USR1 JOB` does the same by hand). The script forwards
it to every process of the job step (`scancel --signal=USR1`); the ranks agree on a step (an all-reduce
of the flag), checkpoint and stop, and the script requeues the job (`scontrol requeue`). The requeued
job runs the same script with the same run directory, so the trainer resumes from that checkpoint. The
signal reaches every node's torchrun too, which then shuts down rather than restarting its ranks.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unroll.launch import frozen_config
from unroll.launch.local import TORCHRUN_ENV, torchrun_flags, train_args

CONTAINER_PYTHON = "/opt/venv/bin/python"  # docker/Dockerfile's environment


class LaunchError(RuntimeError):
    """sbatch is missing or refused the job; the message carries its stderr."""


@dataclass
class SlurmJob:
    run_dir: Path  # absolute
    config: Path  # the frozen, resolved config the job trains from
    nodes: int
    procs_per_node: int
    gpus_per_node: int = 0  # 0: CPU ranks (gloo), no GPU requested
    job_name: str = "unroll"
    workdir: Path = field(default_factory=Path.cwd)
    partition: str = ""
    account: str = ""
    time: str = ""
    signal_lead: int = 120  # seconds before the time limit; 0: no warning signal
    shutdown_timeout: int = 90  # seconds the ranks get to checkpoint after the signal
    max_restarts: int = 0  # in-job restarts of a node's ranks after a failure (torchrun --max-restarts)
    exclusive: bool = True  # the whole node for the job
    cpus_per_task: int = 0  # CPUs of each node's one task; 0: all of the node's (needs exclusive)
    mem: str = "0"  # memory per node as sbatch takes it; "0": all of it; "": the cluster's default
    container_image: str = ""
    container_mounts: str = ""
    python: str = sys.executable
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def log_file(self) -> Path:
        return self.run_dir / "slurm" / "job-%j.out"


def _node_command(job: SlurmJob) -> str:
    """The torchrun command each srun task runs; `bash -c` expands the per-node variables there."""
    rdzv = [
        "--nnodes",
        str(job.nodes),
        "--nproc-per-node",
        str(job.procs_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "$UNROLL_RDZV_HOST:$UNROLL_RDZV_PORT",
        "--rdzv-id",
        "$SLURM_JOB_ID.$UNROLL_RESTART",
        # the first node hosts the rendezvous store: its hostname may be every node's
        "--rdzv-conf",
        'is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)',
    ]
    flags = torchrun_flags("$UNROLL_LOG_DIR/node$SLURM_NODEID", job.shutdown_timeout, job.max_restarts)
    quoted = [f'"{w}"' if "$" in w else shlex.quote(w) for w in rdzv + flags]
    lines = [f"exec {shlex.quote(job.python)} -m torch.distributed.run"]
    lines += [" ".join(quoted[i : i + 2]) for i in range(0, len(quoted), 2)]  # one option per line
    lines.append(" ".join(shlex.quote(w) for w in train_args(str(job.config), [])))
    return " \\\n    ".join(lines)


def render(job: SlurmJob) -> str:
    """The sbatch script for `job`."""
    d = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--chdir={job.workdir}",
        f"--output={job.log_file}",
        "--open-mode=append",
        "--requeue",
    ]
    if job.gpus_per_node:
        d.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.exclusive:
        d.append("--exclusive")
    if job.cpus_per_task:
        d.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.mem:
        d.append(f"--mem={job.mem}")
    d += [
        f"--{key}={value}"
        for key, value in (("partition", job.partition), ("account", job.account), ("time", job.time))
        if value
    ]
    if job.signal_lead:
        d.append(f"--signal=B:USR1@{job.signal_lead}")
    d += job.sbatch_args
    # srun's own: from SLURM 22.05 it need not take the job's, and a task may get one CPU for all its ranks
    cpus = job.cpus_per_task or '"$SLURM_CPUS_ON_NODE"'
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    if job.container_image:  # pyxis
        srun += [f"--container-image={job.container_image}", f"--container-workdir={job.workdir}"]
        if job.container_mounts:
            srun.append(f"--container-mounts={job.container_mounts}")
    exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in TORCHRUN_ENV.items())
    return f"""#!/bin/bash
# Written by `unroll launch slurm`: {job.nodes} node(s) × {job.procs_per_node} rank(s) \
({f"{job.gpus_per_node} GPU(s) per node" if job.gpus_per_node else "CPU, gloo"}).
# Resubmitting it (`sbatch {job.run_dir / "slurm/job.sbatch"}`) resumes the run from its newest checkpoint.
{chr(10).join("#SBATCH " + x for x in d)}
set -uo pipefail

export RUN_DIR={shlex.quote(str(job.run_dir))}
export UNROLL_RESTART=${{SLURM_RESTART_COUNT:-0}}  # requeues; torchrun counts its in-job restarts itself
nodes=($(timeout 60 scontrol show hostnames "$SLURM_JOB_NODELIST"))
# The first node's address as SLURM knows it: hostnames may not resolve, or may all name one machine.
export UNROLL_RDZV_HOST=$(timeout 60 scontrol show node "${{nodes[0]}}" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export UNROLL_RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))
export UNROLL_LOG_DIR="$RUN_DIR/logs/job$SLURM_JOB_ID.$UNROLL_RESTART"
{exports}
echo "unroll: job $SLURM_JOB_ID (requeue $UNROLL_RESTART) on ${{nodes[*]}}, rendezvous" \\
     "$UNROLL_RDZV_HOST:$UNROLL_RDZV_PORT; per-rank logs in $UNROLL_LOG_DIR/node*/"

preempted=0
on_preemption() {{  # SLURM's warning: every rank checkpoints at the same step and stops
  [ "$preempted" = 1 ] && return
  preempted=1
  echo "unroll: SIGUSR1 at $(date +%FT%T): checkpointing, then requeueing"
  timeout 60 scancel --signal=USR1 "$SLURM_JOB_ID"  # every process of the job step, on every node
}}
trap on_preemption USR1

{" ".join(srun)} bash -c {shlex.quote(_node_command(job))} &
srun_pid=$!
wait "$srun_pid"; status=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; status=$?; done  # a trap ends `wait` early
if [ "$preempted" = 1 ] && [ "$status" != 0 ]; then
  echo "unroll: requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR's newest checkpoint"
  timeout 60 scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "unroll: the requeue failed; resubmitting resumes the run: sbatch {job.run_dir / "slurm/job.sbatch"}"
  exit "$status"
fi
echo "unroll: job $SLURM_JOB_ID finished, exit status $status"
exit "$status"
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unroll launch slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="a YAML config file or a preset name (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU (NCCL)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo): no GPUs requested; needs --nproc-per-node")
    p.add_argument("--nproc-per-node", type=int, default=0, help="ranks per node with --cpu")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", default="", help="time limit, as sbatch takes it (e.g. 24:00:00)")
    p.add_argument("--job-name", default="", help="default unroll-<run dir name>")
    p.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="seconds before the time limit SLURM sends SIGUSR1 (checkpoint, stop, requeue); 0: none",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=90,
        help="seconds the ranks get to checkpoint after SIGUSR1 before SIGKILL (default 90)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="times each node's torchrun restarts its ranks "
        "after a failure, within the job, resuming from the newest checkpoint (default 0)",
    )
    p.add_argument(
        "--exclusive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the whole of each node for the job (default); --no-exclusive shares nodes and needs --cpus-per-task",
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=0,
        metavar="C",
        help="CPUs for each node's task (torchrun and its ranks); default all of the node's "
        "($SLURM_CPUS_ON_NODE of the exclusive node)",
    )
    p.add_argument(
        "--mem",
        default="0",
        help="memory per node as sbatch takes it, e.g. 480G; default 0, "
        "SLURM's 'all of each node's memory'; '' leaves it to the cluster's default",
    )
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="leave the data files' check to the ranks "
        "(this machine does not see them, e.g. they are only inside the container image)",
    )
    p.add_argument(
        "--replace-config",
        action="store_true",
        help="submit even though RUN_DIR/slurm/config.yaml, frozen by an earlier submission, differs "
        "(it is kept as config.<time>.yaml); only when no job of this run is queued or running",
    )
    p.add_argument(
        "--container-image",
        default="",
        help="pyxis: run each node's torchrun in this image "
        "(e.g. a squashfs from `enroot import dockerd://unroll:cuda`)",
    )
    p.add_argument(
        "--container-mounts",
        default=None,
        help="pyxis mounts, SRC:DST,...; default the working directory and the run directory",
    )
    p.add_argument(
        "--python",
        default="",
        help="the nodes' Python with unroll installed; default this one "
        f"({sys.executable}), or {CONTAINER_PYTHON} with --container-image",
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check, print the script and write it with its config "
        "under RUN_DIR/slurm/dry-run/; submit nothing, change nothing in RUN_DIR/slurm/",
    )
    return p


def prepare(args) -> tuple[SlurmJob, str]:
    """Checks the options and the run on its ranks (train/preflight.py) and resolves the config: the job,
    and the YAML to freeze into RUN_DIR/slurm/config.yaml (a requeued job trains from exactly what was
    submitted). Writes nothing."""
    from unroll.train.config import ConfigError, load_config, to_yaml
    from unroll.train.preflight import preflight

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {args.nodes}")
    if args.cpu == bool(args.gpus_per_node):
        raise ConfigError("give either --gpus-per-node G (one rank per GPU) or --cpu --nproc-per-node P")
    if args.cpu and args.nproc_per_node < 1:
        raise ConfigError("--cpu needs --nproc-per-node P (ranks per node), at least 1")
    if args.gpus_per_node and (args.gpus_per_node < 0 or args.nproc_per_node):
        raise ConfigError("with --gpus-per-node the ranks per node are the GPUs: leave out --nproc-per-node")
    if args.signal_lead < 0 or args.shutdown_timeout < 1:
        raise ConfigError("--signal-lead must be >= 0 and --shutdown-timeout >= 1")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.cpus_per_task < 0:
        raise ConfigError(f"--cpus-per-task must be 1 or more (0: all of the node's), got {args.cpus_per_task}")
    if not args.exclusive and not args.cpus_per_task:
        raise ConfigError(
            "--no-exclusive needs --cpus-per-task C: sharing the node, the job gets only the CPUs "
            "it asks for (one per node by default)"
        )
    workdir = Path.cwd()
    cfg = load_config(args.config, args.overrides)
    run_dir = (workdir / cfg.run.dir).resolve()
    frozen = [f"run.dir={run_dir}"] + (["run.device=cpu"] if args.cpu else [])
    cfg = load_config(args.config, [*args.overrides, *frozen])
    procs_per_node = args.nproc_per_node if args.cpu else args.gpus_per_node
    preflight(cfg, args.nodes * procs_per_node, data=not args.skip_data_check)  # before anything is queued
    mounts = args.container_mounts
    if mounts is None:  # the working directory (relative data paths) and the run directory, at their own paths
        inside = run_dir == workdir or workdir in run_dir.parents
        mounts = ",".join(f"{d}:{d}" for d in ([workdir] if inside else [workdir, run_dir]))
    job = SlurmJob(
        run_dir=run_dir,
        config=run_dir / "slurm" / "config.yaml",
        nodes=args.nodes,
        procs_per_node=procs_per_node,
        gpus_per_node=0 if args.cpu else args.gpus_per_node,
        job_name=args.job_name or f"unroll-{run_dir.name}",
        workdir=workdir,
        partition=args.partition,
        account=args.account,
        time=args.time,
        signal_lead=args.signal_lead,
        shutdown_timeout=args.shutdown_timeout,
        max_restarts=args.max_restarts,
        exclusive=args.exclusive,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        container_image=args.container_image,
        container_mounts=mounts if args.container_image else "",
        python=args.python or (CONTAINER_PYTHON if args.container_image else sys.executable),
        sbatch_args=args.sbatch_arg,
    )
    return job, to_yaml(cfg)


def submit(script: Path, timeout: float = 60) -> str:
    """sbatch SCRIPT → the job id. Always under a timeout: sbatch hangs while munged is down."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: is this a SLURM login node? (--dry-run writes the script only)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"sbatch gave no answer in {timeout:g} s (slurmctld or munged down?)") from None
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {script} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    from unroll.train.config import ConfigError

    args = parser().parse_intermixed_args(argv)
    job, config_text = prepare(args)
    script_text = render(job)
    changed = frozen_config.differences(job.config, config_text) if job.config.exists() else []
    if args.dry_run:
        return _dry_run(job, config_text, script_text, changed, args.replace_config)
    if changed and not args.replace_config:
        raise ConfigError(frozen_config.refusal(job.config, changed))
    job.config.parent.mkdir(parents=True, exist_ok=True)
    kept = frozen_config.keep_aside(job.config) if changed else None
    created = not job.config.exists()
    if created:
        frozen_config.write_atomically(job.config, config_text)
    script = job.config.parent / "job.sbatch"
    frozen_config.write_atomically(script, script_text)  # sbatch keeps its own copy for requeues
    script.chmod(0o755)
    try:
        job_id = submit(script)
    except LaunchError as e:
        if created:  # no job reads it: a corrected submission must not be refused for it
            job.config.unlink()
            if kept:
                kept.rename(job.config)
        print(f"unroll launch slurm: error: {e}", file=sys.stderr)
        return 1
    if kept:
        print(f"replaced the frozen config; the earlier one is kept as {kept}")
    print(f"submitted job {job_id}: {script} (config {job.config})")
    print(f"console (rank 0, torchrun): {str(job.log_file).replace('%j', job_id)}")
    print(f"per-rank logs: {job.run_dir}/logs/job{job_id}.<requeue>/node<N>/*/attempt_<restart>/<local rank>/")
    return 0


def _dry_run(job: SlurmJob, config_text: str, script_text: str, changed: list[str], replace: bool) -> int:
    """The script printed, and written with the config it would freeze under RUN_DIR/slurm/dry-run/: the
    frozen config and script a queued job uses stay as they are."""
    out = job.config.parent / "dry-run"
    out.mkdir(parents=True, exist_ok=True)
    frozen_config.write_atomically(out / "config.yaml", config_text)
    frozen_config.write_atomically(out / "job.sbatch", script_text)
    print(script_text)
    print(
        f"dry run, nothing submitted: the script and the config it would freeze are in {out}/ "
        f"(job.sbatch, config.yaml); the job's own files in {job.config.parent}/ are left as they are"
    )
    if changed and not replace:
        print(f"note: submitting now would be refused: {frozen_config.refusal(job.config, changed)}")
    return 0
