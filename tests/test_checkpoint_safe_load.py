"""Loading a checkpoint or an export runs no code from it. A crafted pickle in a checkpoint (as its RNG
file, its DCP metadata, or a value in its shards), with the manifest rewritten to match it as an attacker
would, is refused naming the file, and what unpickling it would have run never runs; so is an export
whose weights are pickled. Checkpoints written before the RNG states became JSON (rng_rank{r}.pt) still
resume exactly."""

import io
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import losses, run_cli

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, rng_state, storage
from unroll.train.lifecycle.export import export, import_export
from unroll.train.lifecycle.export_format import ExportError
from unroll.train.lifecycle.inference import load_model
from unroll.train.optim import build_optimizer
from unroll.train.trainer import train


class RunsCode:
    """Unpickling this object runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def raw_pickle(marker) -> bytes:
    return pickle.dumps({"python": RunsCode(marker)})


def torch_saved(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"python": RunsCode(marker), "torch": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


def copy_run(straight, tmp_path):
    """A copy of the straight run to tamper with, and its newest checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight.run.dir, run_dir)
    return run_dir, checkpoint.checkpoint_root(run_dir) / "step_00000012"


def fresh(cfg):
    model = LM(cfg.model)
    return model, build_optimizer(model, cfg)


@pytest.mark.parametrize("crafted", [raw_pickle, torch_saved], ids=["raw_pickle", "torch_save"])
def test_a_crafted_rng_file_is_refused_and_runs_nothing(straight, tmp_path, crafted, capsys):
    run_dir, newest = copy_run(straight, tmp_path)
    marker = tmp_path / "marker"
    (newest / rng_state.file_name(0)).unlink()
    (newest / rng_state.legacy_file_name(0)).write_bytes(crafted(marker))
    (newest / integrity.MANIFEST).unlink()
    integrity.write_manifest(newest, 12, straight.model)  # the attacker makes the manifest match
    assert integrity.problem(newest, straight.model) is None

    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"checkpoint {newest} refused: {newest}/rng_rank0\.pt: "
        r"refused, not loaded \(loading it could run code\)",
    ):
        checkpoint.load(newest, *fresh(straight))
    capsys.readouterr()
    state = checkpoint.load_latest(run_dir, *fresh(straight))  # the one before it is used
    assert state["step"] == 8 and "rng_rank0.pt: refused" in capsys.readouterr().err
    assert not marker.exists()


def test_crafted_dcp_metadata_and_values_are_refused(straight, tmp_path):
    """DCP pickles its .metadata and the optimizer's hyperparameters; neither is unpickled unchecked."""
    run_dir, newest = copy_run(straight, tmp_path)
    marker = tmp_path / "marker"
    (newest / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    integrity.write_manifest(newest, 12, straight.model)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"{newest}/\.metadata asks for \w+\.system, which DCP "
        r"metadata never holds; not loaded",
    ):
        checkpoint.load(newest, *fresh(straight))
    assert not marker.exists()

    # a value in the shards (the optimizer's learning rate, pickled by DCP) that runs code when unpickled
    step8 = checkpoint.checkpoint_root(run_dir) / "step_00000008"
    model, optimizer = fresh(straight)
    checkpoint.load(step8, model, optimizer)
    view = checkpoint.save_view(model, optimizer)
    view["optim"]["param_groups"][0]["lr"] = RunsCode(marker)
    for f in [*step8.glob("*.distcp"), step8 / ".metadata"]:
        f.unlink()
    with checkpoint._quiet_single_process():
        dcp.save(view, checkpoint_id=str(step8), no_dist=True, storage_writer=storage.ChecksummingWriter(step8))
    integrity.write_manifest(step8, 8, straight.model)  # and the checksums, written with the shards
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"the value optim\.param_groups\.0\.lr asks for "
        r"\w+\.system, which a checkpoint's values never hold",
    ):
        checkpoint.load(step8, *fresh(straight))
    assert not marker.exists()


def test_legacy_pt_rng_files_resume_exactly(straight, config_at, tmp_path, capsys):
    """A checkpoint whose RNG file is rng_rank0.pt (torch.save of the states, as unroll wrote before) resumes,
    its RNG states restored bit for bit and training continuing exactly."""
    run_dir, _ = copy_run(straight, tmp_path)
    step8 = checkpoint.checkpoint_root(run_dir) / "step_00000008"
    saved = rng_state.read(step8, 0)
    (step8 / rng_state.file_name(0)).unlink()
    torch.save(
        {"python": saved["python"], "numpy": saved["numpy"], "torch": saved["torch"]},
        step8 / rng_state.legacy_file_name(0),
    )
    shutil.rmtree(checkpoint.checkpoint_root(run_dir) / "step_00000012")
    integrity.write_manifest(step8, 8, straight.model)

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert checkpoint.load(step8, *fresh(straight))["step"] == 8
    assert random.getstate() == saved["python"]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy"]))
    assert torch.equal(torch.get_rng_state(), saved["torch"])

    cfg = config_at(tmp_path, "run")
    capsys.readouterr()
    train(cfg)
    assert "resumed at step 8" in capsys.readouterr().out
    assert losses(run_dir) == losses(straight.run.dir)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_an_export_with_pickled_weights_is_refused(straight, tmp_path, offline_env, name):
    exported = tmp_path / "export"
    export(straight.run.dir, exported, fmt="unroll")
    marker = tmp_path / "marker"
    (exported / "model.safetensors").unlink()
    buffer = io.BytesIO()
    torch.save({"embed.weight": RunsCode(marker)}, buffer)
    (exported / name).write_bytes(buffer.getvalue())
    words = f"{exported / name}: pickled weights, not read (unpickling can run code)"
    with pytest.raises(ExportError, match=words.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_model(exported)  # unroll generate EXPORT
    with pytest.raises(ExportError, match="pickled weights, not read"):
        import_export(exported, tmp_path / "imported")
    for args in (["generate", exported, "--prompt", "To be"], ["import", exported, "--out", tmp_path / "o"]):
        proc = run_cli(args, offline_env, check=False)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()


def test_rng_states_round_trip_through_json_exactly(tmp_path):
    """Python's and numpy's cached Gaussians included (a Box-Muller draw leaves one behind)."""
    random.seed(5), np.random.seed(7), torch.manual_seed(9)
    random.gauss(0, 1), np.random.standard_normal()
    rng_state.write(tmp_path / rng_state.file_name(0), rng_state.capture())
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rng_state.restore(rng_state.read(tmp_path, 3))  # a rank beyond the saved ones takes rank 0's
    assert draws() == expected


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda d: d.pop("numpy"), "numpy is missing"),
        (lambda d: d["python"]["state"].pop(), "python.state must be 625 integers"),
        (lambda d: d["numpy"].__setitem__("key", ["x"] * 624), "numpy.key must be 624 integers"),
        (lambda d: d.__setitem__("torch", d["torch"][:-8]), "torch is not a valid torch RNG state"),
        (lambda d: d.__setitem__("torch", "not base64!"), "torch is not base64"),
    ],
)
def test_a_malformed_rng_file_is_refused_naming_the_key(tmp_path, damage, words):
    doc = rng_state.to_json(rng_state.capture())
    damage(doc)
    path = tmp_path / rng_state.file_name(0)
    path.write_text(json.dumps(doc))
    with pytest.raises(rng_state.RNGStateError, match=f"{path}: {words}"):
        rng_state.read(tmp_path, 0)
