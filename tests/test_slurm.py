"""`unroll launch slurm` against a real SLURM (tests/slurm_cluster.py: munged, slurmctld and two slurmd
on this host): a 2-node × 2-rank CPU job trains to completion, and so does the same job on DeepSpeed's
engine (parallel.engine=deepspeed), to its losses; a job warned of preemption (SIGUSR1 to
its batch shell, as `--signal=B:USR1@LEAD` sends it) checkpoints, is requeued and resumes to the very
losses of the uninterrupted job; a rank killed mid-job with `--max-restarts 1` is restarted within the
allocation, with every other rank, and they too reach those losses. The script itself is checked without
SLURM."""

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import DEEPSPEED_EXTENSIONS, run_cli, tiny_config_dict
from fault_hook import fault_env
from paused_run import pause_env, wait_for_pause
from slurm_cluster import SlurmCluster, missing_binaries

from unroll.launch.cli import main
from unroll.train.metrics import read_metrics

STEPS = 12
# 12 steps of 4 ranks; checkpoints only at the end or on a signal: the requeued job must resume from the
# checkpoint the signal made, not from a periodic one. Validation: one batch of 2 per rank.
SECTIONS = dict(
    train={"steps": STEPS, "batch_size": 8}, eval={"every": 6, "batches": 4, "batch_size": 2}, checkpoint={"every": 0}
)


def launch(args: list, capsys) -> tuple[int, str, str]:
    code = main(["launch", "slurm", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_writes_the_script(tmp_path, small_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "gpu")))
    code, out, _ = launch(
        [
            config,
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "big",
            "--time",
            "2:00:00",
            "--signal-lead",
            "300",
            "--container-image",
            "/images/unroll.sqsh",
            "--dry-run",
            "train.steps=7",
            "train.batch_size=32",
        ],
        capsys,
    )
    assert code == 0
    script = (tmp_path / "gpu/slurm/dry-run/job.sbatch").read_text()
    assert script in out
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=big",
        "#SBATCH --time=2:00:00",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/gpu/slurm/job-%j.out",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    ]:  # the whole node: all its memory and CPUs
        assert line + "\n" in script
    assert "--cpus-per-task" not in script.split("set -uo")[0]  # an exclusive node's: all of them, as srun says
    assert 'srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE"' in script
    assert (
        "--container-image=/images/unroll.sqsh" in script and "/opt/venv/bin/python -m torch.distributed.run" in script
    )
    assert f"--container-mounts={os.getcwd()}:{os.getcwd()},{tmp_path}/gpu:{tmp_path}/gpu" in script
    for option in ["--nnodes 4", "--nproc-per-node 8", "--rdzv-backend c10d", "--max-restarts 0"]:
        assert f"    {option} \\\n" in script, option
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script  # each attempt's rank 0 hosts a fresh store
    frozen = yaml.safe_load((tmp_path / "gpu/slurm/dry-run/config.yaml").read_text())
    assert frozen["train"]["steps"] == 7 and frozen["run"]["dir"] == str(tmp_path / "gpu")
    assert frozen["run"]["device"] == "auto"
    assert f"train {tmp_path}/gpu/slurm/config.yaml" in script  # the path a submission freezes it at

    code, out, _ = launch(
        [
            config,
            "--nodes",
            "2",
            "--cpu",
            "--nproc-per-node",
            "3",
            "--max-restarts",
            "2",
            "--no-exclusive",
            "--cpus-per-task",
            "6",
            "--mem",
            "16G",
            "--dry-run",
            "run.dir=" + str(tmp_path / "cpu"),
            "train.batch_size=6",
        ],
        capsys,
    )
    assert "--gpus-per-node" not in out and "--container" not in out and "--nproc-per-node 3" in out
    assert "    --max-restarts 2 \\\n" in out
    assert "#SBATCH --exclusive" not in out and "#SBATCH --cpus-per-task=6\n" in out and "#SBATCH --mem=16G\n" in out
    assert "--ntasks-per-node=1 --cpus-per-task=6 bash -c" in out
    assert yaml.safe_load((tmp_path / "cpu/slurm/dry-run/config.yaml").read_text())["run"]["device"] == "cpu"

    for bad, message in [
        (["--nodes", "2"], "either --gpus-per-node G"),
        (["--nodes", "2", "--cpu"], "--cpu needs --nproc-per-node"),
        (["--nodes", "0", "--cpu", "--nproc-per-node", "1"], "--nodes must be at least 1"),
        (
            ["--nodes", "1", "--cpu", "--nproc-per-node", "1", "--max-restarts", "-1"],
            "--max-restarts must be 0 or more, got -1",
        ),
        (["--nodes", "1", "--cpu", "--nproc-per-node", "1", "train.stepz=3"], "train.stepz"),
        (
            ["--nodes", "1", "--cpu", "--nproc-per-node", "1", "--no-exclusive"],
            "--no-exclusive needs --cpus-per-task C",
        ),
    ]:
        code, _, err = launch([config, *bad, "--dry-run"], capsys)
        assert code == 2 and message in err, (bad, err)


def test_the_run_is_checked_on_the_jobs_ranks_before_anything_is_written(tmp_path, small_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "run")))  # train.batch_size 4
    for flags, message in [
        (["--cpu", "--nproc-per-node", "3"], "train.batch_size=4 is not divisible by the 6 data-parallel ranks"),
        (
            ["--gpus-per-node", "2", "parallel.pp=2", "train.batch_size=2"],
            "parallel.pp=2 with parallel.pp_schedule=1F1B runs 2 stages",
        ),
        (
            ["--gpus-per-node", "1", "data.valid=" + str(tmp_path / "nowhere")],
            f"config key 'data.valid': token shard file missing: '{tmp_path}/nowhere.idx'",
        ),
    ]:
        for dry in ([], ["--dry-run"]):
            code, out, err = launch([config, "--nodes", "2", *flags, *dry], capsys)
            assert code == 2 and message in err and len(err.splitlines()) == 1, (flags, err)
            assert not (tmp_path / "run").exists()  # nothing written, nothing queued
    code, _, _ = launch(
        [
            config,
            "--nodes",
            "2",
            "--gpus-per-node",
            "1",
            "--skip-data-check",
            "--dry-run",
            "data.valid=" + str(tmp_path / "nowhere"),
        ],
        capsys,
    )
    assert code == 0  # left to the ranks: this machine may not see the data


def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that records its calls in the returned file and answers job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_a_submitted_jobs_frozen_config_is_never_changed_under_it(tmp_path, small_data, capsys, monkeypatch):
    calls = fake_sbatch(tmp_path, monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "run")))
    job = [config, "--nodes", "1", "--cpu", "--nproc-per-node", "2"]
    code, out, _ = launch([*job, "train.steps=7"], capsys)
    assert code == 0 and "submitted job 4242" in out and len(calls.read_text().splitlines()) == 1
    slurm_dir = tmp_path / "run" / "slurm"
    frozen = {name: (slurm_dir / name).read_text() for name in ("config.yaml", "job.sbatch")}
    assert yaml.safe_load(frozen["config.yaml"])["train"]["steps"] == 7

    # a dry run writes beside them, says where, and that a submission would be refused
    code, out, _ = launch([*job, "train.steps=9", "optim.lr=0.001", "--time", "1:00:00", "--dry-run"], capsys)
    assert code == 0
    assert {name: (slurm_dir / name).read_text() for name in frozen} == frozen
    assert yaml.safe_load((slurm_dir / "dry-run" / "config.yaml").read_text())["train"]["steps"] == 9
    assert "#SBATCH --time=1:00:00" in (slurm_dir / "dry-run" / "job.sbatch").read_text()
    assert f"{slurm_dir}/dry-run/" in out and "optim.lr: 0.003 → 0.001, train.steps: 7 → 9" in out

    # a submission that differs is refused, naming the keys; nothing is written or queued
    code, _, err = launch([*job, "train.steps=9", "optim.lr=0.001"], capsys)
    assert code == 2 and "optim.lr: 0.003 → 0.001, train.steps: 7 → 9" in err and "--replace-config" in err, err
    assert {name: (slurm_dir / name).read_text() for name in frozen} == frozen
    assert len(calls.read_text().splitlines()) == 1

    # the same config again (a resubmission that resumes the run) goes ahead, the frozen file untouched
    code, out, _ = launch([*job, "train.steps=7", "--time", "2:00:00"], capsys)
    assert code == 0 and "submitted job 4242" in out and len(calls.read_text().splitlines()) == 2
    assert (slurm_dir / "config.yaml").read_text() == frozen["config.yaml"]
    assert "#SBATCH --time=2:00:00" in (slurm_dir / "job.sbatch").read_text()

    # replaced on request, the earlier one kept
    code, out, _ = launch([*job, "train.steps=9", "--replace-config"], capsys)
    assert code == 0 and "submitted job 4242" in out
    assert yaml.safe_load((slurm_dir / "config.yaml").read_text())["train"]["steps"] == 9
    kept = [p for p in slurm_dir.glob("config.*.yaml")]
    assert len(kept) == 1 and kept[0].read_text() == frozen["config.yaml"] and str(kept[0]) in out


def test_a_frozen_config_is_read_as_a_config(tmp_path, small_data, capsys, monkeypatch):
    """Written by an earlier version: a key added since, at its default, is no difference; one since
    removed is."""
    fake_sbatch(tmp_path, monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "run")))
    job = [config, "--nodes", "1", "--cpu", "--nproc-per-node", "2"]
    assert launch(job, capsys)[0] == 0
    frozen = tmp_path / "run" / "slurm" / "config.yaml"
    older = yaml.safe_load(frozen.read_text())
    del older["train"]["spike_window"]
    frozen.write_text(yaml.safe_dump(older))
    code, out, err = launch(job, capsys)
    assert code == 0 and "submitted job 4242" in out, err
    older["train"]["old_key"] = 1
    frozen.write_text(yaml.safe_dump(older))
    code, _, err = launch(job, capsys)
    assert code == 2 and "differs: train.old_key: 1 → (absent)" in err, err


def test_a_failed_submission_freezes_nothing(tmp_path, small_data, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / "run")))
    job = [config, "--nodes", "1", "--cpu", "--nproc-per-node", "2"]
    code, _, err = launch([*job, "train.steps=7"], capsys)
    assert code == 1 and "sbatch not found" in err
    assert not (tmp_path / "run" / "slurm" / "config.yaml").exists()  # a corrected config is not refused for it
    calls = fake_sbatch(tmp_path, monkeypatch)
    code, out, _ = launch([*job, "train.steps=8"], capsys)
    assert code == 0 and "submitted job 4242" in out and calls.exists()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"no SLURM here ({', '.join(missing)} missing): .ci/run installs Debian's "
            f"slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd starts job steps as their user: the test cluster needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, config, env, *flags) -> str:
    out = run_cli(
        [
            "launch",
            "slurm",
            config,
            "--nodes",
            "2",
            "--cpu",
            "--nproc-per-node",
            "2",
            "--shutdown-timeout",
            "30",
            *flags,
        ],
        dict(env, SLURM_CONF=str(slurm.conf)),
        timeout=120,
    ).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


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
    job = slurm.job(job_id)  # every CPU of both nodes, not one per node (--exclusive; --cpus-per-task for srun)
    assert (job["NumCPUs"], job["OverSubscribe"]) == ("4", "NO"), job


def test_a_deepspeed_job_runs_unchanged_to_the_losses_of_the_torch_engine(
    slurm, uninterrupted, small_data, offline_env, tmp_path
):
    # parallel.engine=deepspeed (ZeRO-2) as the same 2-node × 2-rank job, launched as any config: the FSDP
    # job's losses (float32, another reduction order: within 2e-5)
    pytest.importorskip("deepspeed")
    straight, _ = uninterrupted
    run_dir = tmp_path / "run"
    cfg = tiny_config_dict(small_data, run_dir, **SECTIONS)
    config = tmp_path / "deepspeed.yaml"
    config.write_text(yaml.safe_dump(cfg | {"parallel": {"engine": "deepspeed"}, "deepspeed": {"zero_stage": 2}}))
    job_id = submit(slurm, config, dict(offline_env, TORCH_EXTENSIONS_DIR=DEEPSPEED_EXTENSIONS))
    info = slurm.wait_job(job_id, timeout=300)
    assert info["JobState"] == "COMPLETED", (info, console(run_dir, job_id), slurm.log_tail())
    assert "DeepSpeed ZeRO-2 over 4 rank(s)" in console(run_dir, job_id)
    want, got = losses(straight), losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=2e-5), step


def test_preempted_job_is_requeued_and_resumes_to_the_same_losses(
    slurm, uninterrupted, small_data, offline_env, tmp_path
):
    straight, _ = uninterrupted
    run_dir = tmp_path / "run"
    config = tmp_path / "preempted.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(small_data, run_dir, **SECTIONS)))
    job_id = submit(slurm, config, pause_env(offline_env, 2))  # every rank waits after step 2 for a signal
    wait_for_pause(
        run_dir, 2, ranks=4, running=lambda: slurm.job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")
    )
    # what `--signal=B:USR1@LEAD` does LEAD seconds before the time limit
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm.wait_job(job_id, timeout=240)
    out = console(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert "stopped by signal 10 at step 2" in out, out
    assert "resumed at step 2" in out  # from the checkpoint the signal made (no periodic ones)
    assert "requeueing job" in out and f"job {job_id} finished, exit status 0" in out
    assert (run_dir / "logs" / f"job{job_id}.1").is_dir()  # the requeued run: same run directory
    assert losses(run_dir) == losses(straight)  # bit for bit


def test_a_killed_rank_is_restarted_within_the_job_to_the_same_losses(
    slurm, uninterrupted, small_data, offline_env, tmp_path
):
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
