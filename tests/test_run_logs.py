"""What a run prints: one plain line per logged step on stdout, readable in a file, a pipe or a SLURM log;
the progress bar only on a terminal; no torch warnings that ask nothing of the user."""

import io
import re
import sys

from conftest import run_cli, torchrun_train

from unroll.train.metrics import Metrics

STEP_LINE = re.compile(
    r"^step (\d+)/6: loss \d+\.\d{4}  lr \d\.\d\de-\d\d  grad_norm \d+\.\d{3}  tokens/s [\d,]+  tflops/gpu [\d.e+-]+"
    r"(  mfu \d+\.\d%)?$"  # mfu where the device's peak is known (train/mfu.py)
)


def test_a_piped_run_logs_one_plain_line_per_logged_step(tiny_config, offline_env):
    config = tiny_config("piped", train={"steps": 6, "log_every": 2}, logging={"progress": True})
    proc = run_cli(["train", config], offline_env)  # stdout and stderr are pipes, as in a job's log
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ") and "val_loss" not in line]
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == [2, 4, 6], proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # no progress bar redraws in the log


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_drawn_only_on_a_terminal(tmp_path, monkeypatch):
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        metrics = Metrics(
            tmp_path,
            enabled=True,
            total_steps=4,
            start_step=0,
            wandb_mode="disabled",
            wandb_project="x",
            config={},
            progress=True,
        )
        metrics.advance(4)
        metrics.close()
        assert ("4/4" in stream.getvalue()) == drawn, stream.getvalue()


def test_a_two_rank_fsdp_run_prints_no_torch_warnings(tiny_config, offline_env):
    """The two that every sharded run printed: a DeviceMesh deprecation and FSDP2's view-tensor caution
    (train/parallel/mesh.py and train/parallel/parallelize.py say why each is safe to ignore)."""
    config = tiny_config("fsdp", train={"steps": 2})
    proc = torchrun_train(2, config, offline_env, "parallel.dp_shard=2")
    for text in ("Slicing a flattened dim from root mesh", "returned a view tensor"):
        assert text not in proc.stderr, proc.stderr[-3000:]
