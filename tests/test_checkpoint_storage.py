"""Every byte of a checkpoint checksummed as it is written and verified as it is read
(train/checkpoint/storage.py), in one process: each kind of file corrupted is refused, named, marked REFUSED,
and the previous checkpoint loaded whole; rotation never keeps a checkpoint that fails its checks in place of
the newest good one, nor deletes a refused one; checkpoints saved before checksums still load."""

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from unroll.models import LM
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, storage
from unroll.train.config import load_config
from unroll.train.optim import build_optimizer

CFG = load_config("tiny-gru", ["model.d_model=64", "model.pattern=GG"])


def fresh():
    model = LM(CFG.model)
    return model, build_optimizer(model, CFG)


def snapshot(model, optimizer) -> list[torch.Tensor]:
    optim = optimizer.state_dict()["state"]
    return [t.clone() for t in model.state_dict().values()] + [
        optim[p][k].clone() for p in sorted(optim) for k in sorted(optim[p])
    ]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def two_saves(tmp_path):
    """A run directory with checkpoints at steps 4 and 8 (other weights, other AdamW state); the state at 4."""
    torch.manual_seed(0)
    model, optimizer = fresh()
    checkpoint.save_view(model, optimizer)  # AdamW's state exists, as in a run
    for state in optimizer.state.values():
        for value in state.values():
            value.copy_(torch.rand_like(value))
    checkpoint.save(tmp_path, 4, model, optimizer, {"samples_consumed": 16}, keep=5)
    at_4 = snapshot(model, optimizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for state in optimizer.state.values():
            for value in state.values():
                value.mul_(2.0)
    checkpoint.save(tmp_path, 8, model, optimizer, {"samples_consumed": 32}, keep=5)
    return tmp_path, at_4


def flip(f, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def flip_last_item(step_dir):
    """The item written last into the largest shard: the load has put earlier items in place when it fails."""
    shard = max(step_dir.glob("*.distcp"), key=lambda f: f.stat().st_size)
    offset, (length, _) = max(storage.read_checksums(step_dir)[shard.name].items())
    flip(shard, offset + length // 2)


def flip_middle(name):
    return lambda step_dir: flip(step_dir / name, (step_dir / name).stat().st_size // 2)


DAMAGE = {
    "shard": (
        flip_last_item,
        r"rank 0 read __0_\d\.distcp bytes \d+\.\.\d+ \(tensor \S+\) do not match their "
        r"checksum \(corrupted\)",
    ),
    "metadata": (flip_middle(".metadata"), r"file \.metadata does not match its checksum \(corrupted\)"),
    "checksums": (flip_middle("checksums.json"), r"file checksums\.json does not match its checksum \(corrupted\)"),
    "rng": (flip_middle("rng_rank0.json"), r"file rng_rank0\.json does not match its checksum \(corrupted\)"),
    "train_state": (
        flip_middle("train_state.json"),
        r"file train_state\.json does not match its checksum \(corrupted\)",
    ),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_file_corrupted_is_refused_and_the_previous_loaded_whole(two_saves, kind, capsys):
    run_dir, at_4 = two_saves
    newest = checkpoint.checkpoint_root(run_dir) / "step_00000008"
    damage, reason = DAMAGE[kind]
    damage(newest)
    model, optimizer = fresh()
    if kind == "shard":  # items read before the damaged one are already in the model when the load fails
        before = snapshot(model, optimizer)
        with pytest.raises(checkpoint.CheckpointError) as failed:
            checkpoint.load(newest, model, optimizer)
        assert failed.value.damaged and not equal(snapshot(model, optimizer), before)
    capsys.readouterr()

    state = checkpoint.load_latest(run_dir, model, optimizer)
    err = capsys.readouterr().err
    assert state["step"] == 4 and state["samples_consumed"] == 16
    assert re.search(f"checkpoint {newest} refused: {reason}; trying the previous checkpoint", err), err
    assert equal(snapshot(model, optimizer), at_4)  # nothing of step 8 is left
    assert re.search(reason, (newest / integrity.REFUSED).read_text())
    assert integrity.problem(newest).startswith(f"marked {integrity.REFUSED} by an earlier load (checkpoint {newest}")
    assert checkpoint.good_checkpoints(run_dir)[-1][0] == 4


def test_every_byte_is_covered_by_a_checksum(two_saves):
    run_dir, _ = two_saves
    path = checkpoint.checkpoint_root(run_dir) / "step_00000008"
    manifest = integrity.read_manifest(path)
    shards = {name: size for name, size in manifest["files"].items() if name.endswith(".distcp")}
    assert len(shards) == storage.IO_THREADS  # one file per writing thread
    assert set(manifest["xxh3_128"]) == set(manifest["files"]) - set(shards)
    assert storage.untiled(storage.read_checksums(path), shards) is None


def test_untiled_names_gaps_overlaps_and_a_short_cover():
    sums = {"a.distcp": {0: (10, "x"), 10: (5, "y")}}
    assert storage.untiled(sums, {"a.distcp": 15}) is None
    assert storage.untiled(sums, {"a.distcp": 20}) == "a.distcp: bytes 15..20 have no checksum"
    assert (
        storage.untiled({"a.distcp": {0: (10, "x"), 12: (3, "y")}}, {"a.distcp": 15})
        == "a.distcp: bytes 10..12 have no checksum"
    )
    assert (
        storage.untiled({"a.distcp": {0: (10, "x"), 8: (7, "y")}}, {"a.distcp": 15})
        == "a.distcp: items overlap at byte 8"
    )


def test_rotation_keeps_the_newest_good_checkpoint_and_every_refused_one(two_saves, monkeypatch):
    run_dir, _ = two_saves
    root = checkpoint.checkpoint_root(run_dir)
    real_manifest = integrity.write_manifest

    def damaged_after_writing(path, step, model_cfg=None):  # a disk that corrupts a file once it is written
        real_manifest(path, step, model_cfg)
        if step == 12:
            flip(path / checkpoint.STATE_FILE, 2)

    monkeypatch.setattr(integrity, "write_manifest", damaged_after_writing)
    model, optimizer = fresh()
    checkpoint.save(run_dir, 12, model, optimizer, {"samples_consumed": 48}, keep=1)
    # 12 fails its checks: 8 stays as the newest good checkpoint, 4 goes
    assert [s for s, _ in checkpoint.checkpoint_dirs(run_dir)] == [8, 12]
    assert [s for s, _ in checkpoint.good_checkpoints(run_dir)] == [8]

    integrity.mark_refused(root / "step_00000008", "as a resume would")
    for step in (16, 20):
        checkpoint.save(run_dir, step, model, optimizer, {"samples_consumed": 4 * step}, keep=1)
    assert [s for s, _ in checkpoint.checkpoint_dirs(run_dir)] == [8, 12, 20]  # 16 pruned, the bad ones kept


def test_a_checkpoint_saved_before_checksums_still_loads_unverified(two_saves):
    run_dir, at_4 = two_saves
    path = checkpoint.checkpoint_root(run_dir) / "step_00000004"
    (path / storage.CHECKSUMS).unlink()  # as an older unroll wrote it: sha256 of the files up to 1 MiB
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.name != integrity.MANIFEST}
    sha = {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name, size in files.items() if size <= 1 << 20
    }
    model_arch = integrity.read_manifest(path)["model"]
    (path / integrity.MANIFEST).write_text(json.dumps({"step": 4, "files": files, "sha256": sha, "model": model_arch}))
    assert integrity.problem(path, CFG.model) is None
    model, optimizer = fresh()
    with pytest.warns(UserWarning, match="saved before per-item checksums: its shards are read unverified"):
        checkpoint.load(path, model, optimizer)
    assert equal(snapshot(model, optimizer), at_4)
    flip(path / checkpoint.STATE_FILE, 2)  # its small files are still checked
    assert "train_state.json does not match its checksum" in integrity.problem(path)


def test_a_failed_write_in_any_writer_thread_fails_the_save(two_saves, monkeypatch):
    """DCP writes io_threads files per rank on as many threads and reports only its own thread's failure;
    a full disk under any one of the files stops the save, naming the file, and leaves nothing behind."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    run_dir, _ = two_saves
    real = FileSystem.create_stream

    class Full:
        def __init__(self, raw):
            self.raw = raw

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.raw.name))

        def __getattr__(self, name):
            return getattr(self.raw, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as raw:
            yield Full(raw) if Path(path).name == "__0_3.distcp" else raw

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    model, optimizer = fresh()
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"step_00000012 not saved: \[Errno 28\] No space left on "
        r"device: '.*step_00000012\.tmp/__0_3\.distcp'",
    ):
        checkpoint.save(run_dir, 12, model, optimizer, {"samples_consumed": 48}, keep=5)
    left = sorted(p.name for p in checkpoint.checkpoint_root(run_dir).iterdir())
    assert left == ["step_00000004", "step_00000008"]


def test_tensors_of_every_form_load_straight_from_the_mapped_file(tmp_path, monkeypatch):
    """The reader copies each saved tensor from the mapped shard into its target without torch.load's own
    allocation: dtypes, a scalar, a transposed tensor and a view into a larger storage come back bit for bit,
    and none of them takes the torch.load path."""
    import torch.distributed.checkpoint as dcp

    base = torch.randn(6, 40, dtype=torch.float64)
    saved = {
        "f32": torch.randn(33, 17),
        "bf16": torch.randn(5, 9).to(torch.bfloat16),
        "i64": torch.arange(-7, 50),
        "scalar": torch.tensor(3.5),
        "transposed": torch.randn(8, 12).t(),
        "view": base[2:5, 3:30],
        "u8": torch.randint(0, 255, (1001,), dtype=torch.uint8),
    }
    with checkpoint._quiet_single_process():
        dcp.save(saved, storage_writer=storage.ChecksummingWriter(tmp_path, thread_count=2))
    took_torch_load = []
    real_load = torch.load

    def spying_load(f, *args, map_location=None, **kwargs):
        if map_location != "meta":
            took_torch_load.append(f)
        return real_load(f, *args, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    loaded = {k: torch.zeros_like(v) for k, v in saved.items()}
    with checkpoint._quiet_single_process():
        dcp.load(loaded, storage_reader=storage.VerifyingReader(tmp_path, storage.read_checksums(tmp_path)))
    assert not took_torch_load
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def _record(tensor: torch.Tensor, byteorder: bytes | None) -> bytes:
    """A torch.save record of `tensor` with its `byteorder` entry replaced (None: removed, as older torch
    wrote them)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            if entry.filename.endswith("/byteorder"):
                if byteorder is not None:
                    dst.writestr(entry.filename, byteorder)
            else:
                dst.writestr(entry.filename, src.read(entry.filename))
    return out.getvalue()


def test_a_record_in_the_other_byte_order_is_left_to_torch_load():
    """A record saved on a machine of the other byte order needs its bytes swapped, which torch.load does: the
    in-place copy declines it, and takes records that declare this machine's order or none."""
    from types import SimpleNamespace

    tensor = torch.randn(4, 5)
    req = SimpleNamespace(storage_offsets=torch.Size([0, 0]), lengths=tensor.shape, storage_index="x")
    other = "big" if sys.byteorder == "little" else "little"
    for order, in_place in ((sys.byteorder, True), (None, sys.byteorder == "little"), (other, False)):
        item = memoryview(bytearray(_record(tensor, None if order is None else order.encode())))
        assert storage._byte_order(item) == (order or "little")
        target = torch.zeros_like(tensor)
        assert storage._copy_in_place(item, req, target) is in_place, order
        assert torch.equal(target, tensor if in_place else torch.zeros_like(tensor)), order
