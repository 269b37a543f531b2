"""The run directory: a refused `unroll train` leaves it as it was, a finished run says what to change."""
from pathlib import Path

from conftest import run_cli
from unroll.train import checkpoint
from unroll.train.config import load_config


def snapshot(run_dir: Path) -> dict:
    """Every file of the run directory but the checkpoints' contents: its config, metrics, plot, tokenizer."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_a_refused_train_leaves_the_run_as_it_was(tiny_config, offline_env):
    config = tiny_config("run", train={"steps": 6})
    run_cli(["train", config], offline_env)
    run_dir = Path(load_config(str(config)).run.dir)
    before = snapshot(run_dir)

    proc = run_cli(["train", config, "model.pattern=GG"], offline_env, check=False)  # another model, same run.dir
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert proc.stderr.startswith(f"unroll train: error: run.dir={run_dir} holds a run of another model "
                                  f"(pattern='GA' in the checkpoint, 'GG' here)"), proc.stderr
    assert snapshot(run_dir) == before  # config.yaml byte for byte, no config.<time>.yaml beside it

    assert run_cli(["generate", run_dir, "--prompt", "KING.", "--max-new-tokens", "4"], offline_env).stdout.startswith("KING.")
    resumed = run_cli(["train", run_dir / "config.yaml", "train.steps=8"], offline_env)
    assert "resumed at step 6" in resumed.stdout
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [4, 6, 8]


def test_a_finished_run_says_what_to_change_and_touches_nothing(tiny_config, offline_env):
    config = tiny_config("done", train={"steps": 4})
    run_cli(["train", config], offline_env)
    run_dir = Path(load_config(str(config)).run.dir)
    before = snapshot(run_dir)

    proc = run_cli(["train", config], offline_env)  # exit 0: nothing failed, the run is complete
    assert proc.stdout.strip() == (f"run {run_dir} already at step 4 of train.steps=4: nothing to train; "
                                   f"to continue, raise train.steps (e.g. train.steps=8)"), proc.stdout
    assert snapshot(run_dir) == before
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [4]
