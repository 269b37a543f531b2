"""The run directory: a refused `unroll train` leaves it as it was, a finished run says what to change, and
relative data paths follow the config file that names them, so a run works from any directory."""

import os
import subprocess
from pathlib import Path

import yaml
from conftest import UNROLL, run_cli, tiny_config_dict

import unroll.configs
from unroll.train.checkpoint import resolve
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
    assert proc.stderr.startswith(
        f"unroll train: error: run.dir={run_dir} holds a run of another model "
        f"(pattern='GA' in the checkpoint, 'GG' here; newest checkpoint "
        f"{run_dir / 'checkpoints' / 'step_00000006'})"
    ), proc.stderr
    assert snapshot(run_dir) == before  # config.yaml byte for byte, no config.<time>.yaml beside it

    generated = run_cli(["generate", run_dir, "--prompt", "KING.", "--max-new-tokens", "4"], offline_env)
    assert generated.stdout.startswith("KING.")
    resumed = run_cli(["train", run_dir / "config.yaml", "train.steps=8"], offline_env)
    assert "resumed at step 6" in resumed.stdout
    assert [s for s, _ in resolve.complete_checkpoints(run_dir)] == [4, 6, 8]


def test_a_finished_run_says_what_to_change_and_touches_nothing(tiny_config, offline_env):
    config = tiny_config("done", train={"steps": 4})
    run_cli(["train", config], offline_env)
    run_dir = Path(load_config(str(config)).run.dir)
    before = snapshot(run_dir)

    proc = run_cli(["train", config], offline_env)  # exit 0: nothing failed, the run is complete
    assert proc.stdout.strip() == (
        f"run {run_dir} already at step 4 of train.steps=4: nothing to train; "
        f"to continue, raise train.steps (e.g. train.steps=8)"
    ), proc.stdout
    assert snapshot(run_dir) == before
    assert [s for s, _ in resolve.complete_checkpoints(run_dir)] == [4]


def test_relative_data_paths_follow_the_config_file(small_data, offline_env, tmp_path):
    """A config in conf/ names its data relative to itself; trained from another directory, its run keeps
    absolute paths, and resumes and generates from a third."""
    conf, work, elsewhere = tmp_path / "conf", tmp_path / "work" / "deeper", tmp_path / "elsewhere"
    for d in (conf, work, elsewhere):
        d.mkdir(parents=True)
    cfg = tiny_config_dict(small_data, Path("runs/rel"), train={"steps": 4})  # run.dir: from the current directory
    cfg["data"].update(
        train=[os.path.relpath(small_data.train, conf)],
        valid=os.path.relpath(small_data.valid, conf),
        tokenizer=os.path.relpath(small_data.tokenizer, conf),
    )
    (conf / "exp.yaml").write_text(yaml.safe_dump(cfg))

    def unroll(*args, cwd):
        proc = subprocess.run(
            UNROLL + [str(a) for a in args], cwd=cwd, env=offline_env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    unroll("train", "../../conf/exp.yaml", cwd=work)  # data relative to conf/, not to work/deeper/
    run_dir = work / "runs" / "rel"
    kept = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert kept["data"]["train"] == [small_data.train] and kept["data"]["valid"] == small_data.valid
    assert kept["data"]["tokenizer"] == small_data.tokenizer and kept["run"]["dir"] == str(run_dir)

    resumed = unroll("train", run_dir / "config.yaml", "train.steps=6", cwd=elsewhere)
    assert "resumed at step 4" in resumed.stdout
    generated = unroll("generate", run_dir, "--prompt", "KING.", "--max-new-tokens", "4", cwd=elsewhere)
    assert generated.stdout.startswith("KING.")
    assert not list(elsewhere.iterdir())  # nothing landed in the current directory


def test_presets_and_overrides_resolve_against_the_current_directory(tmp_path, monkeypatch):
    """`make run` trains preset tiny-gru from the repository root: its runs/data/... stays relative to the
    current directory, by name or by its path in the package; so do key=value overrides."""
    monkeypatch.chdir(tmp_path)
    preset = load_config("tiny-gru")
    assert preset.data.tokenizer == str(tmp_path / "runs/data/shakespeare-bpe2048.model")
    assert preset.data.train == [str(tmp_path / "runs/data/shakespeare/train")]
    assert preset.run.dir == str(tmp_path / "runs/tiny-gru")
    by_path = load_config(str(Path(unroll.configs.__file__).parent / "tiny-gru.yaml"), ["data.valid=v", "data.valid=w"])
    assert by_path.data.train == preset.data.train and by_path.data.valid == str(tmp_path / "w")
