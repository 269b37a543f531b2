"""Checkpoint integrity and async saving: a damaged newest checkpoint (truncated shard, missing file, no
manifest, corrupted small file, bytes flipped inside a shard, on one rank of two, another model's weights)
is refused with its directory and the reason, marked REFUSED and kept, the previous one is used and training
continues exactly; rotation keeps the newest good ones; an async-saved run equals a synchronous one."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import torchrun_train

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, resolve, storage
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.optim import build_optimizer
from unroll.train.trainer import train


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def truncate_shard(step_dir):
    shard = max(step_dir.glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def flip_a_byte(step_dir):  # same size, different content
    f = step_dir / checkpoint.STATE_FILE
    data = bytearray(f.read_bytes())
    data[data.index(b"samples_consumed") + 1] ^= 1
    f.write_bytes(bytes(data))


def flip_shard(step_dir, pattern="*.distcp"):
    """Flips 8 bytes in the middle of the largest shard matching `pattern` (same size: only checksums tell)."""
    shard = max(step_dir.glob(pattern), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    shard.write_bytes(bytes(data))
    return shard


SHARD_MISMATCH = r"rank {rank} read {shard} bytes \d+\.\.\d+ \(tensor \S+\) do not match their checksum \(corrupted\)"
DAMAGE = {
    "truncated": (truncate_shard, "is .* bytes, the manifest recorded"),
    "missing_file": (lambda d: sorted(d.glob("*.distcp"))[0].unlink(), r"file __0_0\.distcp is missing"),
    "no_manifest": (lambda d: (d / integrity.MANIFEST).unlink(), "no manifest.json: the save did not finish"),
    "corrupted": (flip_a_byte, "train_state.json does not match its checksum"),
    "shard_bytes": (flip_shard, SHARD_MISMATCH.format(rank=0, shard=r"__0_\d\.distcp")),
}


@pytest.fixture
def straight(tiny_config):
    cfg = load_config(str(tiny_config("straight")))  # 12 steps, checkpoints at 4, 8, 12 (keep 3)
    train(cfg)
    return cfg


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(straight, tiny_config, kind, capsys):
    cfg = load_config(str(tiny_config(kind)))
    shutil.copytree(straight.run.dir, cfg.run.dir)
    newest = checkpoint.checkpoint_root(cfg.run.dir) / "step_00000012"
    damage, reason = DAMAGE[kind]
    damage(newest)
    capsys.readouterr()

    summary = train(cfg)  # refuses step 12, resumes from step 8, trains 9..12 again
    out, err = capsys.readouterr()
    assert "resumed at step 8" in out
    assert f"checkpoint {newest} refused: " in err and "trying the previous checkpoint" in err
    assert re.search(reason, err), err
    assert summary["step"] == 12
    assert losses(cfg.run.dir) == losses(straight.run.dir)  # steps 9..12 redone exactly
    assert integrity.problem(newest, cfg.model) is None  # saved again, whole
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == [4, 8, 12]
    refused = newest.with_name("step_00000012.refused")  # the damaged one, set aside when step 12 was saved again
    assert re.search(reason, (refused / integrity.REFUSED).read_text())


def test_flipped_shard_bytes_are_refused_kept_and_training_continues_exactly(straight, tiny_config, capsys):
    """Bytes flipped inside the newest checkpoint's largest shard: resume names the file and the tensor, goes
    back to step 8 and trains on as a run resumed from step 8 does; the refused checkpoint is kept, unchanged,
    through the saves that follow, and rotation keeps the newest good ones."""
    longer = {"train": {"steps": 20}}
    reference = load_config(str(tiny_config("reference", **longer)))
    shutil.copytree(straight.run.dir, reference.run.dir)
    shutil.rmtree(checkpoint.checkpoint_root(reference.run.dir) / "step_00000012")
    train(reference)  # resumed from step 8
    cfg = load_config(str(tiny_config("flipped", **longer)))
    shutil.copytree(straight.run.dir, cfg.run.dir)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    shard = flip_shard(root / "step_00000012")
    damaged = {f.name: f.read_bytes() for f in (root / "step_00000012").iterdir()}
    capsys.readouterr()

    train(cfg)
    out, err = capsys.readouterr()
    assert "resumed at step 8" in out
    refusal = f"checkpoint {root / 'step_00000012'} refused: " + SHARD_MISMATCH.format(rank=0, shard=shard.name)
    assert re.search(refusal, err), err
    assert losses(cfg.run.dir) == losses(reference.run.dir)  # steps 9..20
    refused = root / "step_00000012.refused"
    assert {f.name: f.read_bytes() for f in refused.iterdir() if f.name != integrity.REFUSED} == damaged
    assert [s for s, _ in checkpoint.checkpoint_dirs(cfg.run.dir)] == [12, 16, 20]  # keep 3: 4 and 8 pruned
    assert [s for s, _ in checkpoint.good_checkpoints(cfg.run.dir, cfg.model)] == [12, 16, 20]


def test_a_checkpoint_marked_refused_is_skipped_everywhere(straight):
    """Resume, export, generation, growth and train.init_from all take the newest good checkpoint."""
    from unroll.train.lifecycle import export, grow, inference

    run_dir = straight.run.dir
    newest, previous = (checkpoint.checkpoint_root(run_dir) / f"step_{s:08d}" for s in (12, 8))
    integrity.mark_refused(newest, "flipped bytes, as a resume found them")
    marked = f"marked {integrity.REFUSED} by an earlier load (flipped bytes, as a resume found them)"
    assert integrity.problem(newest) == marked
    assert checkpoint.good_checkpoints(run_dir)[-1][1] == previous
    assert resolve.checkpoint_of(run_dir, straight.model, setting="train.init_from").path == previous
    assert export.read_checkpoint(run_dir)[2]["step"] == 8
    assert inference.load_run(run_dir)[2] == 8
    assert grow.grow(run_dir, 2, Path(run_dir).parent / "grown")["source"] == str(previous)
    model = LM(straight.model)
    assert checkpoint.load_latest(run_dir, model, build_optimizer(model, straight))["step"] == 8


def test_checkpoint_of_another_model_with_the_same_shapes_is_refused(straight, tiny_config, capsys):
    """n_heads 4 instead of 2: every tensor has the same shape, so DCP alone would load it silently."""
    other = load_config(str(tiny_config("other", model={"n_heads": 4}, train={"steps": 4})))
    train(other)
    cfg = load_config(str(tiny_config("foreign")))
    shutil.copytree(straight.run.dir, cfg.run.dir)
    newest = checkpoint.checkpoint_root(cfg.run.dir) / "step_00000012"
    shutil.rmtree(newest)
    shutil.copytree(checkpoint.checkpoint_root(other.run.dir) / "step_00000004", newest)
    capsys.readouterr()
    model = LM(cfg.model)
    state = checkpoint.load_latest(cfg.run.dir, model, build_optimizer(model, cfg))
    err = capsys.readouterr().err
    assert state["step"] == 8
    assert f"checkpoint {newest} refused: saved from a different model: n_heads=4 in the checkpoint, 2 here" in err
    assert not (newest / integrity.REFUSED).exists()  # not damaged: the right model may still resume from it


def test_no_good_checkpoint_stops_and_deletes_nothing(straight, tiny_config):
    cfg = load_config(str(tiny_config("all_bad")))
    shutil.copytree(straight.run.dir, cfg.run.dir)
    for _, path in checkpoint.checkpoint_dirs(cfg.run.dir):
        truncate_shard(path)
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint in .*all_bad/checkpoints"):
        train(cfg)
    assert len(checkpoint.checkpoint_dirs(cfg.run.dir)) == 3


def test_manifest_records_every_file_and_the_model(straight):
    path = resolve.complete_checkpoints(straight.run.dir)[-1][1]
    manifest = integrity.read_manifest(path)
    on_disk = {f.name for f in path.iterdir()} - {integrity.MANIFEST}
    assert set(manifest["files"]) == on_disk and manifest["step"] == 12
    shards = {name: size for name, size in manifest["files"].items() if name.endswith(".distcp")}
    assert (
        set(manifest["xxh3_128"])
        == on_disk - set(shards)
        == {".metadata", "train_state.json", "rng_rank0.json", "checksums.json"}
    )
    assert storage.untiled(storage.read_checksums(path), shards) is None  # every shard byte in an item
    assert manifest["model"]["pattern"] == "GA" and manifest["model"]["d_model"] == 32
    assert "solver" not in manifest["model"]  # may change on resume


def test_async_save_equals_sync_and_resumes_exactly(straight, tiny_config, monkeypatch, capsys):
    calls = []
    real = dcp.async_save
    monkeypatch.setattr(dcp, "async_save", lambda *a, **k: calls.append(k["checkpoint_id"]) or real(*a, **k))
    cfg = load_config(str(tiny_config("async", checkpoint={"async_save": True})))
    train(cfg)
    assert [c.rsplit("/", 1)[1] for c in calls] == [f"step_{s:08d}.tmp" for s in (4, 8, 12)]
    assert losses(cfg.run.dir) == losses(straight.run.dir)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    assert not list(root.glob("*.tmp"))  # the last async save was finished before train() returned
    for step in (4, 8, 12):
        a, b = (checkpoint.checkpoint_root(d) / f"step_{step:08d}" for d in (straight.run.dir, cfg.run.dir))
        assert integrity.problem(b, cfg.model) is None
        assert json.loads((a / "train_state.json").read_text()) == json.loads((b / "train_state.json").read_text())
        assert_same_checkpoint(cfg, a, b)

    shutil.rmtree(root / "step_00000012")
    capsys.readouterr()
    train(cfg)  # resumes from the async-saved step 8
    assert "resumed at step 8" in capsys.readouterr().out
    assert losses(cfg.run.dir) == losses(straight.run.dir)
    assert_same_checkpoint(cfg, checkpoint.checkpoint_root(straight.run.dir) / "step_00000012", root / "step_00000012")


def assert_same_checkpoint(cfg, a, b):
    loaded = []
    for path in (a, b):
        model = LM(cfg.model)
        optimizer = build_optimizer(model, cfg)
        checkpoint.load(path, model, optimizer)
        loaded.append((model.state_dict(), optimizer.state_dict()["state"], torch.get_rng_state()))
    (ma, oa, ra), (mb, ob, rb) = loaded
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])
    assert torch.equal(ra, rb)


def test_async_save_on_two_fsdp_ranks_equals_sync(tiny_config, offline_env):
    """Under torchrun the background writes run on a gloo group of their own beside training's collectives."""
    runs = {}
    for name, flag in (("sync2", "false"), ("async2", "true")):
        config = tiny_config(name, train={"steps": 8})
        torchrun_train(2, config, offline_env, "parallel.dp_shard=2", f"checkpoint.async_save={flag}")
        runs[name] = load_config(str(config))
    a, b = runs["sync2"], runs["async2"]
    assert losses(a.run.dir) == losses(b.run.dir) and len(losses(a.run.dir)) == 8
    for step in (4, 8):
        pa, pb = (checkpoint.checkpoint_root(c.run.dir) / f"step_{step:08d}" for c in (a, b))
        assert integrity.problem(pb, b.model) is None
        assert {f.name for f in pb.iterdir()} >= {"rng_rank0.json", "rng_rank1.json", "__1_0.distcp"}
        assert_same_checkpoint(a, pa, pb)  # loaded in one process


def test_two_fsdp_ranks_refuse_one_ranks_corrupted_shard_together(tiny_config, offline_env):
    """Rank 1 finds its shard corrupted inside DCP's collective load: both ranks refuse the checkpoint with
    the same error and resume together from the one before, exactly."""
    config = tiny_config("fsdp_flip", train={"steps": 8})
    torchrun_train(2, config, offline_env, "parallel.dp_shard=2")
    cfg = load_config(str(config))
    uninterrupted = losses(cfg.run.dir)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    shard = flip_shard(root / "step_00000008", "__1_*.distcp")

    proc = torchrun_train(2, config, offline_env, "parallel.dp_shard=2")
    assert re.search(
        f"checkpoint {root / 'step_00000008'} refused: " + SHARD_MISMATCH.format(rank=1, shard=shard.name), proc.stderr
    ), proc.stderr[-3000:]
    assert "resumed at step 4" in proc.stdout
    assert losses(cfg.run.dir) == uninterrupted  # steps 5..8 again, exactly
    assert (root / "step_00000008.refused" / integrity.REFUSED).is_file()
    assert integrity.problem(root / "step_00000008", cfg.model) is None
