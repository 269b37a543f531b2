"""A save that cannot write (a full disk, a read-only one, a denied permission), in any file and on any
rank, stops the run naming the path and the OS error, removes its partial `.tmp` directory and leaves
the checkpoints before it intact: resuming from them continues exactly as an uninterrupted run. An async
save's failure stops the run at the step after it, not at the next save."""

import errno
import os
import shutil
import subprocess

import fault_injection
import pytest
import torch
from conftest import torchrun_train

from unroll.launch.torchrun import run_torchrun as torchrun
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, resolve
from unroll.train.metrics import read_metrics
from unroll.train.trainer import train


def losses(run_dir) -> dict:
    """step → loss, the last one logged for each step (a resumed run logs the redone steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def last_step(run_dir) -> int:
    return max(losses(run_dir))


@pytest.fixture(scope="module")
def straight(config_at, tmp_path_factory):
    """12 steps, checkpoints at 4, 8 and 12."""
    cfg = config_at(tmp_path_factory.mktemp("straight"), "straight")
    train(cfg)
    return cfg


def assert_intact(cfg, steps: list[int]) -> None:
    root = checkpoint.checkpoint_root(cfg.run.dir)
    assert [s for s, _ in resolve.complete_checkpoints(cfg.run.dir)] == steps
    assert not list(root.glob("*.tmp")), "the partial directory was left behind"
    for _, path in resolve.complete_checkpoints(cfg.run.dir):
        assert integrity.problem(path, cfg.model) is None


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_stops_the_run_and_the_previous_checkpoint_resumes_exactly(
    straight, config_at, tmp_path, monkeypatch, async_save
):
    cfg = config_at(tmp_path, "full", checkpoint={"async_save": async_save})
    with monkeypatch.context() as m:
        fault_injection.install("full_disk@8", m.setattr)
        with pytest.raises(checkpoint.CheckpointError) as raised:
            train(cfg)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    assert str(raised.value).startswith(
        f"checkpoint {root}/step_00000008 not saved: [Errno {errno.ENOSPC}] "
        f"{os.strerror(errno.ENOSPC)}: '{root}/step_00000008.tmp'; the partial "
        f"step_00000008.tmp is removed, and the checkpoints saved before are kept"
    )
    # in line, the save at step 8 fails; in the background, the step after it sees the failure
    assert last_step(cfg.run.dir) == (9 if async_save else 8)
    assert_intact(cfg, [4])

    assert train(cfg)["step"] == 12  # resumes from step 4
    assert losses(cfg.run.dir) == losses(straight.run.dir)
    assert_intact(cfg, [4, 8, 12])


def small_save(run_dir, step: int):
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return checkpoint.save(run_dir, step, model, optimizer, {"samples_consumed": step}, keep=3), model


def make_read_only(m, tmp_dir_name: str):
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.fspath(path).endswith(tmp_dir_name):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, *args, **kwargs)

    m.setattr(os, "mkdir", mkdir)


# where the save at step 2 fails: each phase of a save, each way a disk refuses a write
WRITE_FAULTS = {
    "read_only_tmp_dir": (lambda m: make_read_only(m, "step_00000002.tmp"), errno.EROFS, "step_00000002.tmp"),
    "full_disk_in_shards": (lambda m: fault_injection.full_disk(m.setattr, 2), errno.ENOSPC, ""),
    "denied_rng_file": (
        lambda m: fault_injection.denied(m.setattr, 2, "rng_rank0.json"),
        errno.EACCES,
        "rng_rank0.json",
    ),
    "denied_manifest": (
        lambda m: fault_injection.denied(m.setattr, 2, "manifest.json.tmp"),
        errno.EACCES,
        "manifest.json.tmp",
    ),
}


@pytest.mark.parametrize("where", sorted(WRITE_FAULTS))
def test_every_write_of_a_save_fails_cleanly(where, tmp_path, monkeypatch):
    first, model = small_save(tmp_path, 1)
    before = {f.name: f.read_bytes() for f in first.iterdir()}
    inject, code, named = WRITE_FAULTS[where]
    with monkeypatch.context() as m:
        inject(m)
        with pytest.raises(
            checkpoint.CheckpointError,
            match=rf"step_00000002 not saved: .*\[Errno {code}\] "
            rf"{os.strerror(code)}.*{named}",
        ):
            small_save(tmp_path, 2)
    assert [s for s, _ in checkpoint.checkpoint_dirs(tmp_path)] == [1]
    assert not list(checkpoint.checkpoint_root(tmp_path).glob("*.tmp"))
    assert {f.name: f.read_bytes() for f in first.iterdir()} == before  # untouched
    loaded = torch.nn.Linear(4, 3)
    assert checkpoint.load(first, loaded, torch.optim.AdamW(loaded.parameters()))["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs(straight, config_at, tmp_path):
    """The straight run's checkpoints up to step 8 on a tmpfs mounted for the test, filled up to less than a
    checkpoint's size: training on from step 8 meets the full disk at the save of step 12."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {mounted.stderr.decode().strip()}")
    try:
        cfg = config_at(disk, "run")
        shutil.copytree(straight.run.dir, cfg.run.dir)
        newest = checkpoint.checkpoint_root(cfg.run.dir) / "step_00000012"
        checkpoint_bytes = sum(f.stat().st_size for f in newest.iterdir())
        shutil.rmtree(newest)
        with open(disk / "filler", "wb") as f:  # leaves half a checkpoint free: room for the log, not a save
            st = os.statvfs(disk)
            f.write(b"\0" * (st.f_bavail * st.f_frsize - checkpoint_bytes // 2))
        with pytest.raises(
            checkpoint.CheckpointError,
            match=rf"step_00000012 not saved: .*\[Errno {errno.ENOSPC}\] {os.strerror(errno.ENOSPC)}",
        ):
            train(cfg)
        assert last_step(cfg.run.dir) == 12
        assert_intact(cfg, [4, 8])
        (disk / "filler").unlink()
        train(cfg)  # space again: resumes from step 8
        assert losses(cfg.run.dir) == losses(straight.run.dir)
        assert_intact(cfg, [4, 8, 12])
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_faults_on_one_of_two_fsdp_ranks_stop_both_and_the_run_resumes_exactly(tiny_config, offline_env, tmp_path):
    """Two FSDP ranks, a fault on rank 1 only, one per run: an async write on a full disk (seen at the next
    step), a write on a full disk, the RNG file denied, a NaN in rank 1's shard. Each run stops on both
    ranks with the message (exit 2), keeps the checkpoints before it, and the next one resumes from them;
    the chain ends with every step's loss as in an uninterrupted 2-rank run."""
    sections = dict(train={"steps": 12}, checkpoint={"every": 2, "keep": 10}, eval={"every": 0})
    straight, chain = tiny_config("straight2", **sections), tiny_config("chain", **sections)
    torchrun_train(2, straight, offline_env, "parallel.dp_shard=2")
    hook = fault_injection.write_hook(tmp_path / "hook")
    env = dict(offline_env, PYTHONPATH=os.pathsep.join(p for p in (str(hook), offline_env.get("PYTHONPATH")) if p))
    run_dir = tmp_path / "chain"
    root = checkpoint.checkpoint_root(run_dir)
    weight = "blocks.0.mixer.out_proj.weight"
    full, denied = (f"[Errno {code}] {os.strerror(code)}" for code in (errno.ENOSPC, errno.EACCES))
    for fault, async_save, stopped_at, words in [
        ("full_disk@4", "true", 5, f"{root}/step_00000004 not saved: {full}: '{root}/step_00000004.tmp' on rank 1"),
        ("full_disk@6", "false", 6, f"{root}/step_00000006 not saved: {full}: '{root}/step_00000006.tmp' on rank 1"),
        (
            "denied@8:rng_rank1.json",
            "false",
            8,
            f"{root}/step_00000008 not saved: {denied}: '{root}/step_00000008.tmp/rng_rank1.json' on rank 1",
        ),
        (f"nan@10:{weight}", "false", 10, f"checkpoint of step 10 refused: model.{weight} on rank 1 holds NaN"),
    ]:
        proc = torchrun(
            [
                "-m",
                "unroll.launch.cli",
                "train",
                str(chain),
                "parallel.dp_shard=2",
                f"checkpoint.async_save={async_save}",
            ],
            2,
            dict(env, FAULT=fault),
            timeout=400,
        )
        assert proc.returncode != 0, fault
        # each rank reports the same failure and ends
        assert proc.stderr.count("unroll train: error: checkpoint") == 2, (fault, proc.stderr[-4000:])
        assert proc.stderr.count(words) == 2, (fault, proc.stderr[-4000:])
        assert last_step(run_dir) == stopped_at, fault
        failed_save = int(fault.split("@")[1].split(":")[0])
        assert [s for s, _ in resolve.complete_checkpoints(run_dir)] == list(range(2, failed_save, 2)), fault
        assert not list(root.glob("*.tmp")), fault
    torchrun_train(2, chain, offline_env, "parallel.dp_shard=2")  # no fault: from step 8 to the end
    assert losses(run_dir) == losses(straight.parent / "straight2") and last_step(run_dir) == 12
    assert [s for s, _ in resolve.complete_checkpoints(run_dir)] == list(range(2, 14, 2))
