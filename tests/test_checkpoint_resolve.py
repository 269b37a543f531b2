"""The one resolver of "which checkpoint" (train/checkpoint/resolve.py), on checkpoint directories made of
their small files and a manifest: it reads nothing else, so no model is trained here. That resume, export,
generation, growth and train.init_from all go through it: test_checkpoint_integrity.py."""

import json
import re
from pathlib import Path

import pytest

from unroll.models.config import ModelConfig
from unroll.train.checkpoint import integrity, resolve
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.checkpoint.rundir import CONFIG_FILE

MODEL = ModelConfig(pattern="GA", d_model=32, n_heads=2)
OTHER = ModelConfig(pattern="GA", d_model=32, n_heads=4)


def saved(run_dir: Path, step: int, model_cfg=MODEL) -> Path:
    """A checkpoint directory as a finished save leaves it, as far as the resolver looks: DCP's index, the
    train state, and the manifest written last."""
    path = resolve.checkpoint_root(run_dir) / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / resolve.METADATA).write_bytes(b"dcp index")
    (path / resolve.STATE_FILE).write_text(json.dumps({"step": step}))
    integrity.write_manifest(path, step, model_cfg)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text("model: {}\n")
    for step in (4, 8, 12):
        saved(run, step)
    return run


def test_the_newest_good_checkpoint_of_a_run_directory(run_dir):
    root = resolve.checkpoint_root(run_dir)
    (root / "step_00000016.tmp").mkdir()  # a save under way is no candidate
    found = resolve.newest_good(run_dir, MODEL)
    assert (found.step, found.path) == (12, root / "step_00000012")
    assert resolve.checkpoint_of(run_dir, MODEL) == found
    assert [s for s, _ in resolve.good_checkpoints(run_dir, MODEL)] == [4, 8, 12]


def test_an_incomplete_newest_checkpoint_is_passed_over(run_dir):
    partial = resolve.checkpoint_root(run_dir) / "step_00000016"
    partial.mkdir()
    (partial / resolve.METADATA).write_bytes(b"half")  # the save stopped before its manifest
    assert resolve.newest_good(run_dir, MODEL).step == 12
    assert [s for s, _ in resolve.good_checkpoints(run_dir)] == [4, 8, 12]


def test_a_manifest_without_dcp_files_is_incomplete(run_dir):
    newest = resolve.checkpoint_root(run_dir) / "step_00000012"
    (newest / resolve.METADATA).unlink()
    integrity.write_manifest(newest, 12, MODEL)  # a manifest that lists what is there, and no index
    assert resolve.refusal(newest, MODEL) == "incomplete: no .metadata"
    assert resolve.newest_good(run_dir, MODEL).step == 8


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_good_one(run_dir):
    newest = resolve.checkpoint_root(run_dir) / "step_00000012"
    (newest / resolve.STATE_FILE).write_text(json.dumps({"step": 99}))  # same size, other bytes
    assert "does not match its checksum" in resolve.refusal(newest, MODEL)
    found = resolve.checkpoint_of(run_dir, MODEL)
    assert found.path == resolve.checkpoint_root(run_dir) / "step_00000008"


def test_another_models_newest_checkpoint_is_passed_over_when_the_model_is_given(run_dir):
    newest = resolve.checkpoint_root(run_dir) / "step_00000012"
    integrity.write_manifest(newest, 12, OTHER)
    assert resolve.newest_good(run_dir).step == 12  # no model to compare: only the files are checked
    assert resolve.newest_good(run_dir, MODEL).step == 8


def test_an_explicit_checkpoint_is_that_one_or_refused(run_dir):
    root = resolve.checkpoint_root(run_dir)
    older = resolve.checkpoint_of(root / "step_00000008", MODEL)
    assert (older.step, older.path) == (8, root / "step_00000008")
    newest = root / "step_00000012"
    (newest / resolve.STATE_FILE).write_text(json.dumps({"step": 77}))
    with pytest.raises(CheckpointError, match=rf"^train.init_from: checkpoint {re.escape(str(newest))} refused: .*"):
        resolve.checkpoint_of(newest, MODEL, setting="train.init_from")  # no fallback: it was named
    assert resolve.run_directory(newest) == run_dir


def test_a_checkpoint_copied_out_of_its_run_resolves_by_its_manifest(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(resolve.checkpoint_root(run_dir) / "step_00000008", copy)
    assert resolve.checkpoint_of(copy, MODEL).step == 8
    with pytest.raises(CheckpointError, match="not inside a run directory"):
        resolve.run_directory(copy)


def test_no_checkpoint_at_all_names_the_run_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(empty))}: no checkpoint in {re.escape(str(empty))}"):
        resolve.newest_good(empty)
    with pytest.raises(CheckpointError, match=r"train.init_from=.*nowhere: no such run or checkpoint directory"):
        resolve.checkpoint_of(tmp_path / "nowhere", setting="train.init_from")
    with pytest.raises(CheckpointError, match="empty: neither a run directory"):
        resolve.run_directory(empty)


def test_none_usable_names_each_refused_candidate_newest_first(run_dir):
    root = resolve.checkpoint_root(run_dir)
    for step in (4, 8, 12):
        integrity.mark_refused(root / f"step_{step:08d}", f"damaged {step}")
    (root / "step_00000016").mkdir()
    with pytest.raises(CheckpointError) as raised:
        resolve.newest_good(run_dir, MODEL, setting="--checkpoint")
    lines = str(raised.value).splitlines()
    assert lines[0] == f"--checkpoint={run_dir}: no usable checkpoint in {root}:"
    assert [line.split(" refused: ")[0].strip() for line in lines[1:]] == [
        f"checkpoint {root / f'step_{s:08d}'}" for s in (16, 12, 8, 4)
    ]
    assert "no manifest.json" in lines[1] and "damaged 12" in lines[2]
