"""`unroll launch slurm` against a real SLURM (tests/slurm_cluster.py: munged, slurmctld and two slurmd
on this host): a 2-node × 2-rank CPU job trains to completion; a job warned of preemption (SIGUSR1 to
its batch shell, as `--signal=B:USR1@LEAD` sends it) checkpoints, is requeued and resumes to the very
losses of the uninterrupted job; a rank killed mid-job with `--max-restarts 1` is restarted within the
allocation, with every other rank, and they too reach those losses. The script itself is checked without
SLURM."""
import os
import re
import time

import pytest
import yaml

from conftest import run_cli, tiny_config_dict
from fault_hook import fault_env
from slurm_cluster import SlurmCluster, missing_binaries
from unroll.launch.cli import main
from unroll.train.metrics import read_metrics

STEPS = 12
# 12 steps of 4 ranks; checkpoints only at the end or on a signal: the requeued job must resume from the
# checkpoint the signal made, not from a periodic one. Validation: one batch of 2 per rank.
SECTIONS = dict(train={"steps": STEPS, "batch_size": 8}, eval={"every": 6, "batches": 4, "batch_size": 2},
                checkpoint={"every": 0})


def launch(args: list, capsys) -> tuple[int, str, str]:
    code = main(["launch", "slurm", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_writes_the_script(tmp_path, small_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "gpu")))
    code, out, _ = launch([config, "--nodes", "4", "--gpus-per-node", "8", "--partition", "big",
                   "--time", "2:00:00", "--signal-lead", "300", "--container-image", "/images/unroll.sqsh",
                           "--dry-run", "train.steps=7"], capsys)
    assert code == 0
    script = (tmp_path / "gpu/slurm/job.sbatch").read_text()
    assert script in out
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=big", "#SBATCH --time=2:00:00", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", f"#SBATCH --output={tmp_path}/gpu/slurm/job-%j.out"]:
        assert line + "\n" in script
    assert "--container-image=/images/unroll.sqsh" in script and "/opt/venv/bin/python -m torch.distributed.run" in script
    assert f"--container-mounts={os.getcwd()}:{os.getcwd()},{tmp_path}/gpu:{tmp_path}/gpu" in script
    for option in ["--nnodes 4", "--nproc-per-node 8", "--rdzv-backend c10d", "--max-restarts 0"]:
        assert f"    {option} \\\n" in script, option
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script  # each attempt's rank 0 hosts a fresh store
    frozen = yaml.safe_load((tmp_path / "gpu/slurm/config.yaml").read_text())
    assert frozen["train"]["steps"] == 7 and frozen["run"]["dir"] == str(tmp_path / "gpu")
    assert frozen["run"]["device"] == "auto"

    code, out, _ = launch([config, "--nodes", "2", "--cpu", "--nproc-per-node", "3", "--max-restarts", "2",
                           "--dry-run", "run.dir=" + str(tmp_path / "cpu")], capsys)
    assert "--gpus-per-node" not in out and "--container" not in out and "--nproc-per-node 3" in out
    assert "    --max-restarts 2 \\\n" in out
    assert yaml.safe_load((tmp_path / "cpu/slurm/config.yaml").read_text())["run"]["device"] == "cpu"

    for bad, message in [(["--nodes", "2"], "either --gpus-per-node G"),
                         (["--nodes", "2", "--cpu"], "--cpu needs --nproc-per-node"),
                         (["--nodes", "0", "--cpu", "--nproc-per-node", "1"], "--nodes must be at least 1"),
                         (["--nodes", "1", "--cpu", "--nproc-per-node", "1", "--max-restarts", "-1"],
                          "--max-restarts must be 0 or more, got -1"),
                         (["--nodes", "1", "--cpu", "--nproc-per-node", "1", "train.stepz=3"], "train.stepz")]:
        code, _, err = launch([config, *bad, "--dry-run"], capsys)
        assert code == 2 and message in err, (bad, err)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): .ci/run installs Debian's "
                    f"slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd starts job steps as their user: the test cluster needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, config, env, *flags) -> str:
    out = run_cli(["launch", "slurm", config, "--nodes", "2", "--cpu", "--nproc-per-node", "2",
                   "--shutdown-timeout", "30", *flags], dict(env, SLURM_CONF=str(slurm.conf)), timeout=120).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def console(run_dir, job_id) -> str:
    return (run_dir / "slurm" / f"job-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(slurm, small_data, offline_env, tmp_path_factory):
    """The 2 × 2 job run straight through: its run directory and job id."""
    root = tmp_path_factory.mktemp("straight")
    config = root / "straight.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, root / "run", **SECTIONS)))
    job_id = submit(slurm, config, offline_env)
    info = slurm.wait_job(job_id, timeout=240)
    assert info["JobState"] == "COMPLETED", (info, console(root / "run", job_id), slurm.log_tail())
    return root / "run", job_id


def losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_two_nodes_of_two_ranks_train_to_completion(slurm, uninterrupted):
    run_dir, job_id = uninterrupted
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    out = console(run_dir, job_id)
    assert "4 rank(s) (dp_shard 4)" in out  # one world of 4 ranks over the 2 nodes
    assert re.search(r"rendezvous 127\.0\.0\.1:\d+", out)  # NodeAddr, not the shared hostname
    assert "[rank0]:" in out and f"job {job_id} finished, exit status 0" in out
    for node in (0, 1):  # every rank's own log files
        logs = sorted((run_dir / "logs" / f"job{job_id}.0" / f"node{node}").glob("*/attempt_0/*/stderr.log"))
        assert [p.parent.name for p in logs] == ["0", "1"], node
    assert (run_dir / "checkpoints").is_dir()


def test_preempted_job_is_requeued_and_resumes_to_the_same_losses(slurm, uninterrupted, small_data,
                                                                   offline_env, tmp_path):
    straight, _ = uninterrupted
    run_dir = tmp_path / "run"
    config = tmp_path / "preempted.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, run_dir, **SECTIONS)))
    job_id = submit(slurm, config, offline_env)
    wait_for(lambda: any(s >= 2 for s in losses(run_dir)), 180, "step 2 of the first run")
    # what `--signal=B:USR1@LEAD` does LEAD seconds before the time limit
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm.wait_job(job_id, timeout=240)
    out = console(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    stopped = int(re.search(r"stopped by signal 10 at step (\d+)", out).group(1))
    assert 2 <= stopped < STEPS
    assert f"resumed at step {stopped}" in out  # from the checkpoint the signal made (no periodic ones)
    assert "requeueing job" in out and f"job {job_id} finished, exit status 0" in out
    assert (run_dir / "logs" / f"job{job_id}.1").is_dir()  # the requeued run: same run directory
    assert losses(run_dir) == losses(straight)  # bit for bit


def test_a_killed_rank_is_restarted_within_the_job_to_the_same_losses(slurm, uninterrupted, small_data,
                                                                       offline_env, tmp_path):
    straight, _ = uninterrupted
    run_dir = tmp_path / "run"
    config = tmp_path / "killed.yaml"
    # checkpoints every 4 steps (the uninterrupted job's losses do not depend on them); rank 1 dies at
    # step 6 of the first attempt. It shares a node with rank 0, whose torchrun therefore counts the restart.
    sections = SECTIONS | {"checkpoint": {"every": 4}}
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, run_dir, **sections)))
    env = fault_env(tmp_path, offline_env, "kill", step=6, attempt="0")
    job_id = submit(slurm, config, env, "--max-restarts", "1")
    info = slurm.wait_job(job_id, timeout=240)
    out = console(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, out)  # not requeued
    assert re.search(r"\[rank0\]:model: .*; restart 0 of 1\n", out), out
    assert "; resumed at step 4; restart 1 of 1\n" in out
    assert list((run_dir / "logs" / f"job{job_id}.0").glob("node*/*/attempt_1/1/stderr.log"))
    assert losses(run_dir) == losses(straight)  # bit for bit
