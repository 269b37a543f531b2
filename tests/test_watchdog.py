"""The per-rank watchdog (run.step_timeout_s): a rank that sleeps in the middle of a step, outside any
collective, writes every thread's stack into its own log and exits; the job ends long before the
collective timeout would have ended it."""

import os
import re

from conftest import run_cli

from unroll.train.watchdog import EXIT_CODE

# Loaded by every process through PYTHONPATH; in the worker of global rank 1 (torchrun's agent has no RANK)
# the forward of its third training step never returns.
SLEEP_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import time
    import torch
    import unroll.train.loss as training_loss
    calls, loss_fn = [0], training_loss.lm_loss

    def sleeps_in_the_forward(*args):
        calls[0] += torch.is_grad_enabled()
        if calls[0] == 3:
            time.sleep(3600)
        return loss_fn(*args)

    training_loss.lm_loss = sleeps_in_the_forward
"""


def test_a_rank_asleep_mid_step_dumps_its_stacks_and_ends_the_job(tiny_config, offline_env, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLEEP_ON_RANK_1)
    env = dict(offline_env, PYTHONPATH=os.pathsep.join(p for p in (str(hook), offline_env.get("PYTHONPATH")) if p))
    config = tiny_config("asleep", train={"steps": 500}, eval={"every": 0}, checkpoint={"every": 0})
    # the collective timeout far above the watchdog's: only the watchdog can end this job within the
    # test's own timeout
    proc = run_cli(
        [
            "launch",
            "local",
            config,
            "--nproc",
            "2",
            "--shutdown-timeout",
            "5",
            "run.step_timeout_s=20",
            "run.collective_timeout_s=3000",
        ],
        env,
        timeout=400,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    logs = {
        p.parent.name: p.read_text() for p in (tmp_path / "asleep" / "logs").glob("local-*/*/attempt_0/*/stderr.log")
    }
    asleep = logs["1"]
    assert "unroll: rank 1: step 3 has run longer than run.step_timeout_s=20 s" in asleep
    assert "in sleeps_in_the_forward" in asleep and "in train_step" in asleep  # the sleeping thread's stack
    assert re.search(rf"exitcode\s*:\s*{EXIT_CODE}\b", proc.stderr), proc.stderr[-2000:]  # torchrun's summary
