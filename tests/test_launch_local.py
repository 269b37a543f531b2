"""`unroll launch local`: a rank that fails or hangs mid-run ends the whole torchrun job within a bounded
time (torchrun without restarts, collective timeouts), with the rank's error in its own log file."""
import time

import pytest

from conftest import run_cli
from unroll.train.metrics import read_metrics

# Loaded by every process through PYTHONPATH; acts only in the worker of global rank 1 (torchrun's agent
# has no RANK): its third optimizer step raises, or hangs outside any collective. The hung rank lets
# SIGTERM end it: otherwise torchrun waits its fixed 30 s before SIGKILL, which only slows the test.
FAULT = '''
import os
if os.environ.get("RANK") == "1":
    import signal
    import time
    import unroll.train.trainer as trainer
    steps, original = [0], trainer.update_expert_bias

    def faulty(*args):
        steps[0] += 1
        if steps[0] == 3:
            if os.environ["FAULT"] == "raise":
                raise RuntimeError("injected failure on rank 1 at step 3")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        return original(*args)

    trainer.update_expert_bias = faulty
'''


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_or_hung_rank_ends_the_job(fault, tiny_config, offline_env, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)
    env = dict(offline_env, PYTHONPATH=str(hook), FAULT=fault)
    config = tiny_config(fault, train={"steps": 500}, eval={"every": 0}, checkpoint={"every": 0})
    start = time.monotonic()
    proc = run_cli(["launch", "local", config, "--nproc", "2", "--shutdown-timeout", "5",
                    "run.collective_timeout_s=5"], env, timeout=150, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    rows = read_metrics(tmp_path / fault)
    assert max(r["step"] for r in rows if "loss" in r) == 2  # rank 0 logged steps 1-2, then stopped
    logs = {p.parent.name: p for p in (tmp_path / fault / "logs").glob("local-*/*/attempt_0/*/stderr.log")}
    assert sorted(logs) == ["0", "1"]
    if fault == "raise":
        assert "RuntimeError: injected failure on rank 1 at step 3" in logs["1"].read_text()
    else:  # rank 0 waited in step 3's collective until run.collective_timeout_s
        assert "Timed out waiting 5000ms" in logs["0"].read_text()
    assert "[rank0]:" in proc.stdout + proc.stderr  # rank 0's output on the console, marked with its rank


def test_dry_run_prints_the_torchrun_command_and_bad_keys_stop_first(tiny_config, capsys):
    from unroll.launch.cli import main

    config = tiny_config("dry")
    assert main(["launch", "local", str(config), "--nproc", "3", "--dry-run", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    for words in ["--standalone --nproc-per-node 3 --max-restarts 0",
                  "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--redirects 3 --tee 3",
                  f"-m unroll.launch.cli train {config} train.steps=2"]:
        assert words in out
    assert main(["launch", "local", str(config), "--nproc", "2", "run.collective_timeout_s=0"]) == 2
    assert "run.collective_timeout_s: must be positive, got 0" in capsys.readouterr().err
