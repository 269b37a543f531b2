"""Prefetching (data/prefetch.py): the batches a synchronous read gives, from any resume step, past and off the
plan; a reader's error raised in the caller; the thread bounded and stopped; and the training loop's losses the
same with it on as off."""

import itertools
import threading
import time
import traceback

import pytest
import torch
from conftest import losses
from test_data_loader import SEQ, write_shard

from unroll.data.errors import DataError
from unroll.data.loader import PackedDataset, TokenLoader
from unroll.data.prefetch import Prefetcher
from unroll.train import data_setup
from unroll.train.config import load_config
from unroll.train.trainer import train


def make_loader(shards):
    return TokenLoader([PackedDataset(p, SEQ) for p in shards], [0.6, 0.4], seed=3, block_size=32)


@pytest.fixture
def shards(tmp_path):
    return [write_shard(str(tmp_path / f"d{d}"), n * SEQ + 1, first=d * 1_000_000) for d, n in enumerate([37, 23])]


def plan(first_step, steps, global_batch=12, rank=1, micro=2, accum=3):
    """The reads of a trainer's rank 1 of 2 (micro-batches of 2, 3 per step) from `first_step` on."""
    for s in range(first_step, first_step + steps):
        first = s * global_batch + rank * micro * accum
        yield from ((first + i * micro, micro) for i in range(accum))


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "unroll-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
@pytest.mark.parametrize("resume_step", [0, 7, 13])
def test_the_batches_a_synchronous_read_gives_from_any_step(shards, depth, resume_step):
    requests = list(plan(resume_step, 6))
    expected = [make_loader(shards).get_with_starts(*r) for r in requests]
    with Prefetcher(make_loader(shards).get_with_starts, iter(requests), depth) as reader:
        for request, (tokens, starts) in zip(requests, expected):
            got = reader(*request)
            assert torch.equal(got[0], tokens) and torch.equal(got[1], starts)
        assert (reader.hits, reader.misses) == ((len(requests), 0) if depth else (0, 0))
        past_the_end = requests[-1][0] + 2, 2  # the run goes on past its plan (a rollback added steps)
        assert torch.equal(reader(*past_the_end)[0], make_loader(shards).get(*past_the_end))
    assert not prefetch_threads()


def test_a_read_off_the_plan_is_read_synchronously(shards):
    requests = list(plan(0, 4))
    reader = Prefetcher(make_loader(shards).get, iter(requests), 2)
    assert torch.equal(reader(*requests[0]), make_loader(shards).get(*requests[0]))
    for off in [(5, 3), requests[1], (0, 1)]:  # not the plan's next: the plan stops, every read is still right
        assert torch.equal(reader(*off), make_loader(shards).get(*off))
    assert (reader.hits, reader.misses) == (1, 1) and not prefetch_threads()


def test_a_reader_error_is_raised_in_the_caller(shards):
    loader = make_loader(shards)
    damaged = DataError("token shard 'd1' is damaged")

    def read(start, count):
        if start >= 8:
            raise damaged
        return loader.get(start, count)

    reader = Prefetcher(read, iter([(0, 4), (4, 4), (8, 4), (12, 4)]), 3)
    assert torch.equal(reader(0, 4), loader.get(0, 4)) and torch.equal(reader(4, 4), loader.get(4, 4))
    with pytest.raises(DataError, match="'d1' is damaged") as raised:
        reader(8, 4)
    assert raised.value is damaged and not prefetch_threads()
    assert "read" in [frame.name for frame in traceback.extract_tb(raised.tb)]  # with the reader's own frames

    # the loader's own errors (a negative start), and a plan that itself fails
    with pytest.raises(IndexError, match=r"samples \[-4, 0\)"):
        Prefetcher(loader.get, iter([(-4, 4)]), 2)(-4, 4)

    def broken_plan():
        yield 0, 2
        raise RuntimeError("plan failed")

    reader = Prefetcher(loader.get, broken_plan(), 2)
    reader(0, 2)
    with pytest.raises(RuntimeError, match="plan failed"):
        reader(2, 2)
    assert not prefetch_threads()


def test_the_thread_reads_at_most_depth_ahead_and_stops_on_close(shards):
    loader, read = make_loader(shards), []

    def counting(start, count):
        read.append(start)
        return loader.get(start, count)

    reader = Prefetcher(counting, ((s, 1) for s in itertools.count()), 2)  # an endless plan
    deadline = time.monotonic() + 30
    while len(read) < 3 and time.monotonic() < deadline:  # 2 queued, 1 more waiting for room
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(read) == 3
    assert torch.equal(reader(0, 1), loader.get(0, 1))
    reader.close()
    assert not prefetch_threads()
    assert len(read) <= 5
    reader.close()  # again: nothing to do


def test_training_with_prefetch_gives_the_losses_without_it(tiny_config, monkeypatch):
    """Prefetch on and off, with 2 micro-batches per step, the run with it resumed at step 3: the same losses;
    every read came from the thread; a reader's error stops the run with it and leaves no thread behind."""
    made = []

    class Recorded(Prefetcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(data_setup, "Prefetcher", Recorded)
    batches = {"batch_size": 4, "micro_batch_size": 2}
    off = load_config(str(tiny_config("off", train=batches | {"steps": 5}, data={"prefetch": 0})))
    train(off)
    train(load_config(str(tiny_config("on", train=batches | {"steps": 3}, data={"prefetch": 2}))))
    on = load_config(str(tiny_config("on", train=batches | {"steps": 5}, data={"prefetch": 2})))
    train(on)
    assert losses(on.run.dir) == losses(off.run.dir) and len(losses(off.run.dir)) == 5
    assert [(p.hits, p.misses) for p in made] == [(0, 0), (3 * 2, 0), (2 * 2, 0)]
    assert not prefetch_threads()

    real = data_setup.RunData.train_batch

    def damaged_at_sample_8(self, start, count, pin=False):
        if start == 8:
            raise DataError("token shard 'train' is damaged")
        return real(self, start, count, pin)

    monkeypatch.setattr(data_setup.RunData, "train_batch", damaged_at_sample_8)
    failing = load_config(str(tiny_config("failing", train=batches | {"steps": 5}, data={"prefetch": 2})))
    with pytest.raises(DataError, match="'train' is damaged"):
        train(failing)
    assert max(losses(failing.run.dir)) == 2 and not prefetch_threads()
