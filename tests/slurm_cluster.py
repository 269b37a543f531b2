"""A real SLURM cluster for the tests, without systemd or root-owned paths: munged on a private socket,
slurmctld, and several slurmd daemons (`slurmd -N name`, each on its own port) standing in for nodes
on this one host. Debian's `slurmctld slurmd slurm-client munge` packages (see .ci/run).

The fake nodes share this machine's hostname, so a job must take a node's address from NodeAddr
(`scontrol show node`), as the sbatch scripts of unroll.launch.slurm do."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + `nodes` slurmd daemons, configured under `root`. `env` is os.environ with
    SLURM_CONF pointing at the generated slurm.conf: pass it to sbatch, scontrol and friends."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2, memory_mb: int = 4000) -> None:
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._cpus, self._memory = cpus, memory_mb

    # -- setup ---------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        lines = [
            "ClusterName=unrolltest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            # cred_expire: a requeued job becomes eligible cred_expire + 1 s later (default 120 s)
            f"AuthInfo=socket={r / 'munge.sock'},cred_expire=5",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",  # no cgroups, no systemd
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job starts soon
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the fake nodes claim the same cores
            "MailProg=/bin/true",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self._cpus} Sockets=1 CoresPerSocket={self._cpus} ThreadsPerCore=1 "
                f"RealMemory={self._memory} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.console", "w")
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_config()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            [
                _binary("munged"),
                "-F",
                "--force",
                f"--socket={self.root / 'munge.sock'}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'log/munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged's socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self.scontrol("ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld")
        for name in self.nodes:
            self._spawn([_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
        self._wait(self._nodes_idle, timeout, "the nodes to be idle")
        return self

    def _nodes_idle(self) -> bool:
        out = self.scontrol("show", "nodes", "-o", check=False).stdout
        states = [f.split("=", 1)[1] for line in out.splitlines() for f in line.split() if f.startswith("State=")]
        return len(states) == len(self.nodes) and all(s.startswith("IDLE") for s in states)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"{dead[0].args[0]} exited {dead[0].returncode} while waiting for {what}; "
                    f"logs in {self.root / 'log'}:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(
            f"gave up after {timeout:g} s waiting for {what}; logs in {self.root / 'log'}:\n{self.log_tail()}"
        )

    # -- use -----------------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command, always with a timeout: with munged gone, sbatch and scontrol hang."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(
        self,
        job_id: str,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"),
        timeout: float = 180,
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:g} s")

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-chars:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    # -- teardown ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancels what is left and waits for it, stops the daemons' process groups, then kills whatever
        still carries this cluster's SLURM_CONF (slurmstepd daemonizes out of slurmd's process group, and
        job processes inherit the variable from sbatch)."""
        try:
            self.run("scancel", "--user", str(os.getuid()), timeout=10, check=False)
            self._wait(
                lambda: (
                    not re.search(
                        r"JobState=(RUNNING|COMPLETING|CONFIGURING)",
                        self.scontrol("show", "jobs", "-o", check=False).stdout,
                    )
                ),
                30,
                "the jobs to end",
            )
        except (subprocess.TimeoutExpired, TimeoutError, RuntimeError):
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftovers(self) -> list[int]:
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids
