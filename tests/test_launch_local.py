"""`unroll launch local`: a rank that fails or hangs mid-run ends the whole torchrun job within a bounded
time (collective timeouts), with the rank's error in its own log file, once `--max-restarts` is spent; a
rank killed while restarts remain makes torchrun restart every rank, which resume from the newest
checkpoint to the very losses of an uninterrupted run; a signal torchrun forwards stops the job without
a restart. Signals come once the ranks have paused at a known step (UNROLL_PAUSE_AT_STEP)."""

import os
import re
import signal
import subprocess

import pytest
from conftest import UNROLL, run_cli
from fault_hook import fault_env
from paused_run import parent_pid, pause_env, wait_for_pause

from unroll.train.metrics import read_metrics


def launch(config, env, *flags, check: bool = False):
    return run_cli(
        ["launch", "local", config, "--nproc", "2", "--shutdown-timeout", "5", *flags], env, timeout=240, check=check
    )


def start(config, env, *flags, stdout) -> subprocess.Popen:
    """`launch` in the background, its stderr with its stdout; `*flags` after the defaults override them."""
    args = [*UNROLL, "launch", "local", str(config), "--nproc", "2", "--shutdown-timeout", "5", *flags]
    return subprocess.Popen(args, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> None:
    """Ends a launcher a failed check left running: it hands SIGTERM on and waits, so the ranks are not
    left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)


def rank_logs(run_dir) -> dict[tuple[str, str], str]:
    """(attempt_N, local rank) → that rank's stderr.log."""
    return {
        (p.parent.parent.name, p.parent.name): p.read_text()
        for p in (run_dir / "logs").glob("local-*/*/attempt_*/*/stderr.log")
    }


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
    """SIGTERM to torchrun's agent (as scancel sends it), once both ranks have paused after step 3: the agent
    forwards it, both ranks checkpoint step 3 and stop, and the agent does not restart them."""
    run_dir = tmp_path / "signalled"
    config = tiny_config("signalled", train={"steps": 500}, eval={"every": 0}, checkpoint={"every": 0})
    proc = start(config, pause_env(offline_env, 3), "--max-restarts", "1", stdout=subprocess.PIPE)
    try:
        pids = wait_for_pause(run_dir, 3, ranks=2, running=lambda: proc.poll() is None)
        os.kill(parent_pid(pids[0]), signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        stop(proc)
    assert proc.returncode != 0, out[-2000:]
    assert "stopped by signal 15 at step 3" in out, out[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    assert sorted(rank_logs(run_dir)) == [("attempt_0", "0"), ("attempt_0", "1")]


def test_dry_run_prints_the_torchrun_command_and_bad_keys_stop_first(tiny_config, capsys):
    from unroll.launch.cli import main

    config = tiny_config("dry")
    assert main(["launch", "local", str(config), "--nproc", "4", "--dry-run", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    for words in [
        "-m unroll.launch.torchrun --standalone --nproc-per-node 4 --max-restarts 0",
        "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--redirects 3 --tee 3",
        f"-m unroll.launch.cli train {config} train.steps=2",
    ]:
        assert words in out
    assert main(["launch", "local", str(config), "--nproc", "2", "--max-restarts", "3", "--dry-run"]) == 0
    assert "--max-restarts 3" in capsys.readouterr().out
    assert main(["launch", "local", str(config), "--nproc", "2", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be 0 or more, got -1" in capsys.readouterr().err
    assert main(["launch", "local", str(config), "--nproc", "2", "run.collective_timeout_s=0"]) == 2
    assert "run.collective_timeout_s: must be positive, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nproc", "3"], "train.batch_size=4 is not divisible by the 3 data-parallel ranks"),
        (
            ["--nproc", "2", "parallel.tp=2", "parallel.dp_shard=2"],
            "parallel: pp × dp_replicate × dp_shard × cp × tp = 1 × 1 × 2 × 1 × 2 = 4 ranks, but the world size is 2",
        ),
        (["--nproc", "3", "parallel.tp=3"], "parallel.tp=3 must divide model.vocab_size=320"),
        (
            ["--nproc", "4", "parallel.pp=2", "train.batch_size=2"],
            "parallel.pp=2 with parallel.pp_schedule=1F1B runs 2 stages: each data rank's share of the batch is split into "
            "at least 2 micro-batches that 1F1B accepts, but train.batch_size=2 over 2 data rank(s) is 1 sequence(s) each; "
            "set train.batch_size=4",
        ),
        (
            ["--nproc", "2", "data.train=[/nowhere/train]"],
            "config key 'data.train[0]': token shard file missing: '/nowhere/train.idx'",
        ),
    ],
)
def test_the_launcher_checks_layout_batch_and_data_before_any_process_starts(flags, message, tiny_config, capsys):
    from unroll.launch.cli import main

    config = tiny_config("checked")
    assert main(["launch", "local", str(config), *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unroll launch: error: ") and message in err and err.count("\n") == 1, err


def test_a_refused_layout_starts_no_process(tiny_config, offline_env, tmp_path):
    proc = launch(tiny_config("refused"), offline_env, "parallel.pp=2", "train.batch_size=2", "--nproc", "4")
    assert proc.returncode == 2 and "set train.batch_size=4" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "refused").exists()  # no rank started: no run directory, no logs


def test_pipelining_splits_the_batch_into_micro_batches_by_default(tiny_config, offline_env):
    """parallel.pp=2 with train.micro_batch_size at its default 0: 1F1B needs a micro-batch per stage."""
    config = tiny_config("piped", train={"steps": 2}, eval={"every": 0}, checkpoint={"every": 0})
    proc = launch(config, offline_env, "parallel.pp=2", check=True)
    assert "2 rank(s) (pp 2) × 2 micro-batch(es) of 2 × 32 tokens" in proc.stdout, proc.stdout[-3000:]
    assert [r["step"] for r in read_metrics(config.parent / "piped") if "loss" in r] == [1, 2]


def test_ctrl_c_checkpoints_stops_the_ranks_and_exits_130(tiny_config, offline_env, tmp_path):
    """SIGINT to the launcher (a terminal's Ctrl-C reaches only it: torchrun runs in a session of its own),
    sent once both ranks have paused after step 2: the ranks checkpoint step 2 and stop, the launcher says
    so and exits 130."""
    run_dir = tmp_path / "interrupted"
    config = tiny_config("interrupted", train={"steps": 100000}, eval={"every": 0}, checkpoint={"every": 0})
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        proc = start(config, pause_env(offline_env, 2), "--shutdown-timeout", "120", stdout=out)
    try:
        wait_for_pause(run_dir, 2, ranks=2, running=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=240) == 130, console.read_text()[-3000:]
    finally:
        stop(proc)
    text = console.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.rstrip().endswith("unroll launch: interrupted"), text[-3000:]
    assert "stopped by signal 2 at step 2" in text, text[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
