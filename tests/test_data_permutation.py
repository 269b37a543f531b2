"""The Feistel epoch order (data/permutation.py) and the loader in either order: bijection, keys, resume, ranks,
whole epochs, the numpy order of earlier runs kept exactly; and which order a run reads (train/data_order.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import losses
from test_data_loader import SEQ, ids, write_shard

from unroll.data.errors import DataError
from unroll.data.loader import ORDERS, PackedDataset, TokenLoader, rank_slice
from unroll.data.permutation import FeistelPermutation, feistel, round_keys
from unroll.train import trainer
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.config import DATA_ORDERS, ConfigError, load_config
from unroll.train.data_order import resolved_order

# one; primes; powers of two, and one less and one more (the domain's edges); about 10^5
SIZES = [1, 2, 3, 5, 13, 97, 251, 4, 8, 64, 1024, 7, 63, 1023, 9, 65, 1025, 65535, 65537, 100_003]


@pytest.mark.parametrize("n", SIZES)
def test_a_bijection_of_zero_to_n(n):
    for seed in range(3):
        image = FeistelPermutation(n, (seed, 0, 0))(np.arange(n))
        assert image.dtype == np.int64
        np.testing.assert_array_equal(np.sort(image), np.arange(n))


def test_keys_change_the_order_and_only_they_do():
    n, positions = 1000, np.arange(1000)
    orders = {key: FeistelPermutation(n, key)(positions) for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    for a in orders:
        for b in orders:
            assert (a == b) == np.array_equal(orders[a], orders[b])
    np.testing.assert_array_equal(FeistelPermutation(n, (0, 0, 1))(positions), orders[(0, 0, 1)])
    assert not np.array_equal(orders[(0, 0, 0)], positions)  # shuffled, not the identity


def test_the_same_positions_on_every_machine():
    # A run's data is this map: a change to it (rounds, mixer, key derivation) changes every feistel run's
    # samples on resume, so its values are pinned.
    assert FeistelPermutation(10, (0, 0, 0))(np.arange(10)).tolist() == [6, 9, 8, 0, 5, 7, 3, 4, 2, 1]
    at_2t_tokens = FeistelPermutation(5 * 10**8, (7, 2, 3))  # about the samples of 4096 tokens in 2T
    assert at_2t_tokens(np.array([0, 1, 499_999_999])).tolist() == [343_529_554, 215_735_407, 103_371_428]


def test_positions_any_shape_and_out_of_range():
    perm = FeistelPermutation(50, (1, 2, 3))
    grid = np.arange(50).reshape(5, 10)
    np.testing.assert_array_equal(perm(grid), perm(np.arange(50)).reshape(5, 10))
    assert perm(np.array([], dtype=np.int64)).shape == (0,)
    for bad in [-1, 50]:
        with pytest.raises(IndexError, match=r"\[0, 50\)"):
            perm(np.array([3, bad]))
    with pytest.raises(ValueError, match="size 0"):
        FeistelPermutation(0, (0,))


def test_positions_spread_evenly_over_keys():
    # over many keys every position lands on every sample about equally often: no position is stuck
    n, keys = 6, 1200
    counts = np.zeros((n, n))
    for key in range(keys):
        counts[np.arange(n), FeistelPermutation(n, (key, 0, 0))(np.arange(n))] += 1
    assert counts.min() > 0.7 * keys / n and counts.max() < 1.3 * keys / n  # expected 200, sd about 13


@pytest.fixture
def shards(tmp_path):
    """Three shards of 81, 41 and 21 samples; dataset d's tokens start at d * 1_000_000 (test_data_loader)."""
    return [
        write_shard(str(tmp_path / f"d{d}"), n * SEQ + 1 + d, first=d * 1_000_000) for d, n in enumerate([81, 41, 21])
    ]


def loader(shards, order, weights=(0.5, 0.3, 0.2), seed=1, block_size=64):
    datasets = [PackedDataset(p, SEQ) for p in shards[: len(weights)]]
    return TokenLoader(datasets, list(weights), seed=seed, block_size=block_size, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_resume_anywhere_and_any_world_size_give_the_same_samples(shards, order):
    whole = loader(shards, order).get(0, 300)  # 4+ blocks, several epochs of each dataset
    for k in [1, 63, 64, 65, 81, 200, 299]:  # a fresh loader from any position: no state but the index
        assert torch.equal(torch.cat([loader(shards, order).get(0, k), loader(shards, order).get(k, 300 - k)]), whole)
    global_batch = 12
    for world in [1, 2, 3, 4, 6]:
        fresh = loader(shards, order)
        parts = [fresh.get(*rank_slice(s, global_batch, r, world)) for s in range(0, 300, 12) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 1.0), (0.5, 0.3, 0.2)])
def test_every_sample_once_per_epoch(shards, weights):
    datasets = [PackedDataset(p, SEQ) for p in shards[: len(weights)]]
    seen: dict[int, list[int]] = {d: [] for d in range(len(weights))}
    for d, i in ids(loader(shards, "feistel", weights, block_size=30).get(0, 600)):
        seen[d].append(i)
    for d, order in seen.items():
        n = len(datasets[d])
        epochs = [order[e * n : (e + 1) * n] for e in range(len(order) // n)]
        assert len(epochs) >= 2
        for epoch in epochs:
            assert sorted(epoch) == list(range(n))
        assert epochs[0] != epochs[1]


def numpy_epoch(seed, d, e, n):
    return np.random.default_rng([seed, d, e]).permutation(n)


def feistel_epoch(seed, d, e, n):
    return FeistelPermutation(n, (seed, d, e))(np.arange(n))


@pytest.mark.parametrize("order,epoch_order", [("numpy-permutation", numpy_epoch), ("feistel", feistel_epoch)])
def test_each_dataset_reads_its_epochs_in_the_orders_keyed_by_seed_dataset_epoch(shards, order, epoch_order):
    """Dataset d's samples, in the order the blend reaches them, are epoch after epoch the permutation keyed by
    (seed, d, epoch); for numpy-permutation default_rng([seed, d, epoch]).permutation(n), the order of every
    run before the Feistel one, sample for sample."""
    seed, weights = 9, (0.5, 0.3, 0.2)
    got = ids(loader(shards, order, weights, seed=seed).get(0, 400))
    for d in range(3):
        n = len(PackedDataset(shards[d], SEQ))
        in_order = [i for dd, i in got if dd == d]
        expected = np.concatenate([epoch_order(seed, d, e, n) for e in range(-(-len(in_order) // n))])
        assert in_order == expected[: len(in_order)].tolist()
    assert not torch.equal(
        loader(shards, "feistel", weights, seed=seed).get(0, 400),
        loader(shards, "numpy-permutation", weights, seed=seed).get(0, 400),
    )


def test_many_permutations_at_once_are_each_one_alone():
    sizes = np.array([1, 2, 41, 41, 1000, 5 * 10**8])
    keys = np.stack([round_keys((3, d, d % 2)) for d in range(len(sizes))])
    positions = np.array([0, 1, 40, 17, 999, 123_456_789])
    alone = [FeistelPermutation(int(n), (3, d, d % 2))(positions[d]) for d, n in enumerate(sizes)]
    assert feistel(positions, sizes, keys).tolist() == [int(a) for a in alone]
    with pytest.raises(IndexError, match=r"position 41 outside \[0, 41\)"):
        feistel(np.array([3, 41]), np.array([5, 41]), keys[:2])


def test_an_unknown_order_is_named(shards):
    with pytest.raises(DataError, match="sample order 'random'"):
        loader(shards, "random")
    assert DATA_ORDERS == ("", *ORDERS)  # the config accepts the loader's orders, and "" for the run's own


def test_which_order_a_run_reads():
    """train/data_order.py's table: a new run's order, a resumed run's own (a checkpoint without the key read
    numpy's), and a change on resume refused naming data.order."""
    new, old, saved = None, {"samples_consumed": 40}, {"samples_consumed": 40, "data_order": "feistel"}
    assert resolved_order("", new, "x") == "feistel"
    assert resolved_order("numpy-permutation", new, "x") == "numpy-permutation"
    assert resolved_order("", old, "x") == "numpy-permutation"
    assert resolved_order("", saved, "x") == "feistel"
    assert resolved_order("feistel", {"samples_consumed": 0}, "x") == "feistel"  # nothing read yet: nothing kept
    with pytest.raises(
        ConfigError,
        match=r"config key 'data.order': 'feistel'.*ck/train_state.json.*40 samples.*"
        r"'numpy-permutation' order.*data.order=numpy-permutation",
    ):
        resolved_order("feistel", old, "ck/train_state.json")
    with pytest.raises(ConfigError, match="data.order.*'numpy-permutation'.*'feistel' order"):
        resolved_order("numpy-permutation", saved, "x")
    with pytest.raises(CheckpointError, match="ck: data_order 'shuffled' is not a data order"):
        resolved_order("", {"data_order": "shuffled"}, "ck")


def test_a_run_saved_without_the_key_resumes_in_the_numpy_order(tiny_config, monkeypatch):
    """A run written before data.order (its checkpoints without data_order, read in numpy's order) resumes in
    that order, and records it; asking it for another order is refused, naming the key."""
    steps = {"steps": 6, "batch_size": 4}
    numpy_run = load_config(str(tiny_config("numpy", train=steps, data={"order": "numpy-permutation"})))
    feistel_run = load_config(str(tiny_config("feistel", train=steps)))
    trainer.train(numpy_run), trainer.train(feistel_run)

    saved_state = trainer.TrainingRun.train_state
    with monkeypatch.context() as patch:  # the earlier code: numpy's order, no data_order in the checkpoint
        patch.setattr(trainer.TrainingRun, "train_state", lambda run: without_order(saved_state(run)))
        trainer.train(
            load_config(str(tiny_config("old", train=steps | {"steps": 3}, data={"order": "numpy-permutation"})))
        )
    run_dir = Path(numpy_run.run.dir).parent / "old"
    assert "data_order" not in json.loads((run_dir / "checkpoints/step_00000003/train_state.json").read_text())

    with pytest.raises(
        ConfigError, match="config key 'data.order': 'feistel'.*12 samples in the 'numpy-permutation' order"
    ):
        trainer.train(load_config(str(tiny_config("old", train=steps, data={"order": "feistel"}))))
    trainer.train(load_config(str(tiny_config("old", train=steps))))  # data.order "": the run's own
    resumed = losses(run_dir)
    assert [resumed[s] for s in (4, 5, 6)] == [losses(numpy_run.run.dir)[s] for s in (4, 5, 6)]
    assert [resumed[s] for s in (4, 5, 6)] != [losses(feistel_run.run.dir)[s] for s in (4, 5, 6)]
    newest = json.loads((run_dir / "checkpoints/step_00000006/train_state.json").read_text())
    assert newest["data_order"] == "numpy-permutation"
    assert "order: numpy-permutation" in (run_dir / "config.yaml").read_text()
    assert (
        json.loads((Path(feistel_run.run.dir) / "checkpoints/step_00000006/train_state.json").read_text())["data_order"]
        == "feistel"
    )


def without_order(state: dict) -> dict:
    del state["data_order"]
    return state
