"""`unroll launch local`: a rank that fails or hangs mid-run ends the whole torchrun job within a bounded
time (collective timeouts), with the rank's error in its own log file, once `--max-restarts` is spent; a
rank killed while restarts remain makes torchrun restart every rank, which resume from the newest
checkpoint to the very losses of an uninterrupted run; a signal torchrun forwards stops the job without
a restart."""
import re

import pytest

from conftest import run_cli
from fault_hook import fault_env
from unroll.train.metrics import read_metrics


def launch(config, env, *flags, check: bool = False):
    return run_cli(["launch", "local", config, "--nproc", "2", "--shutdown-timeout", "5", *flags], env,
                   timeout=240, check=check)


def rank_logs(run_dir) -> dict[tuple[str, str], str]:
    """(attempt_N, local rank) → that rank's stderr.log."""
    return {(p.parent.parent.name, p.parent.name): p.read_text()
            for p in (run_dir / "logs").glob("local-*/*/attempt_*/*/stderr.log")}


def trained(run_dir) -> dict:
    """(step, validation row?) → the figures a rerun must reproduce (the last row logged for each)."""
    keys = ("loss", "grad_norm", "val_loss")
    return {(r["step"], "val_loss" in r): {k: r[k] for k in keys if k in r} for r in read_metrics(run_dir)}


@pytest.mark.parametrize("fault, restarts", [("raise", 1), ("hang", 0)])
def test_a_failing_or_hung_rank_ends_the_job(fault, restarts, tiny_config, offline_env, tmp_path):
    env = fault_env(tmp_path, offline_env, fault, step=3)  # on every attempt: a restart fails the same way
    config = tiny_config(fault, train={"steps": 500}, eval={"every": 0}, checkpoint={"every": 0})
    proc = launch(config, env, "--max-restarts", restarts, "run.collective_timeout_s=5")
    assert proc.returncode != 0, proc.stdout[-2000:]
    rows = read_metrics(tmp_path / fault)
    # a step's loss is agreed before its optimizer step, where rank 1 fails: rank 0 logged 1-3, then stopped
    assert max(r["step"] for r in rows if "loss" in r) == 3
    logs = rank_logs(tmp_path / fault)
    assert sorted(logs) == [(f"attempt_{a}", r) for a in range(restarts + 1) for r in "01"]
    if fault == "raise":  # each attempt started afresh (no checkpoint) and failed alike
        for a in range(restarts + 1):
            assert "RuntimeError: injected failure on rank 1 at step 3" in logs[f"attempt_{a}", "1"]
        assert f"restart {restarts} of {restarts}" in proc.stdout
    else:  # rank 0 waited in a collective after step 3 until run.collective_timeout_s ended the job
        assert "Timed out waiting 5000ms" in logs["attempt_0", "0"]
    assert "[rank0]:" in proc.stdout + proc.stderr  # rank 0's output on the console, marked with its rank


def test_a_killed_rank_restarts_the_job_which_resumes_to_the_same_losses(tiny_config, offline_env, tmp_path):
    sections = dict(train={"steps": 8}, eval={"every": 0}, checkpoint={"every": 4})
    launch(tiny_config("straight", **sections), offline_env, check=True)
    env = fault_env(tmp_path, offline_env, "kill", step=6, attempt="0")  # after the step-4 checkpoint
    proc = launch(tiny_config("killed", **sections), env, "--max-restarts", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "killed"
    assert sorted(rank_logs(run_dir)) == [(f"attempt_{a}", r) for a in (0, 1) for r in "01"]
    firsts = re.findall(r"model: .*", proc.stdout)
    assert len(firsts) == 2 and firsts[0].endswith("; restart 0 of 2"), firsts
    assert firsts[1].endswith("; resumed at step 4; restart 1 of 2"), firsts
    assert trained(run_dir) == trained(tmp_path / "straight")  # bit for bit, steps 5-6 redone
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_a_forwarded_signal_checkpoints_and_stops_without_a_restart(tiny_config, offline_env, tmp_path):
    env = fault_env(tmp_path, offline_env, "signal", step=3)
    config = tiny_config("signalled", train={"steps": 500}, eval={"every": 0}, checkpoint={"every": 0})
    proc = launch(config, env, "--max-restarts", "1")
    assert proc.returncode != 0, proc.stdout[-2000:]
    stopped = int(re.search(r"stopped by signal 15 at step (\d+)", proc.stdout).group(1))
    assert stopped >= 3
    assert [p.name for p in (tmp_path / "signalled" / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]
    assert sorted(rank_logs(tmp_path / "signalled")) == [("attempt_0", "0"), ("attempt_0", "1")]


def test_dry_run_prints_the_torchrun_command_and_bad_keys_stop_first(tiny_config, capsys):
    from unroll.launch.cli import main

    config = tiny_config("dry")
    assert main(["launch", "local", str(config), "--nproc", "3", "--dry-run", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    for words in ["--standalone --nproc-per-node 3 --max-restarts 0",
                  "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--redirects 3 --tee 3",
                  f"-m unroll.launch.cli train {config} train.steps=2"]:
        assert words in out
    assert main(["launch", "local", str(config), "--nproc", "2", "--max-restarts", "3", "--dry-run"]) == 0
    assert "--max-restarts 3" in capsys.readouterr().out
    assert main(["launch", "local", str(config), "--nproc", "2", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be 0 or more, got -1" in capsys.readouterr().err
    assert main(["launch", "local", str(config), "--nproc", "2", "run.collective_timeout_s=0"]) == 2
    assert "run.collective_timeout_s: must be positive, got 0" in capsys.readouterr().err
