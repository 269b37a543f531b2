"""A fault injected into `unroll train` ranks deterministically: FAULT is a sitecustomize.py that every
process of a launch loads through PYTHONPATH (torchrun's agent, srun and sbatch pass the environment on).
It acts only in the worker of global rank 1 (torchrun's agent has no RANK), on the attempt FAULT_ATTEMPT
names (TORCHELASTIC_RESTART_COUNT; unset: every attempt). At its FAULT_STEP-th optimizer step it raises,
SIGKILLs itself, or hangs outside any collective. The hung rank lets SIGTERM end it: otherwise torchrun
waits its fixed 30 s before SIGKILL, which only slows a test. (A signal from outside at a known step is
the trainer's own test hook, UNROLL_PAUSE_AT_STEP: tests/paused_run.py.)"""

import os
from pathlib import Path

FAULT = """
import os
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
if os.environ.get("RANK") == "1" and os.environ.get("FAULT_ATTEMPT", attempt) == attempt:
    import signal
    import time
    import unroll.train.step as step
    steps, original = [0], step.update_expert_bias

    def faulty(*args):
        steps[0] += 1
        if steps[0] == int(os.environ["FAULT_STEP"]):
            fault = os.environ["FAULT"]
            if fault == "raise":
                raise RuntimeError(f"injected failure on rank 1 at step {steps[0]}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(3600)
        return original(*args)

    step.update_expert_bias = faulty
"""


def fault_env(root: Path, env: dict, fault: str, step: int, attempt: str | None = None) -> dict:
    """`env` with ROOT/hook/sitecustomize.py ahead of what its PYTHONPATH already holds (this checkout)."""
    hook = root / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAULT)
    env = dict(
        env,
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
        FAULT=fault,
        FAULT_STEP=str(step),
    )
    return env if attempt is None else dict(env, FAULT_ATTEMPT=attempt)
