"""PackedDataset, TokenLoader, rank_slice: packing, determinism, epochs, resume, ranks, blending."""

import numpy as np
import pytest
import torch

from unroll.data.errors import DataError
from unroll.data.loader import PackedDataset, TokenLoader, apportion, rank_slice
from unroll.data.shards import indexed_dataset_module

SEQ = 8


def write_shard(prefix, n_tokens, first=0, doc_len=37):
    """A shard whose token stream is first, first + 1, ...: a window starting at token t begins
    with first + t, so every sample says where it came from."""
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    stream = np.arange(first, first + n_tokens, dtype=np.int32)
    for start in range(0, n_tokens, doc_len):
        builder.add_item(torch.from_numpy(stream[start : start + doc_len]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def shards(tmp_path):
    """Three shards of 81, 41 and 21 samples; dataset d's tokens start at d * 1_000_000."""
    return [
        write_shard(str(tmp_path / f"d{d}"), n * SEQ + 1 + d, first=d * 1_000_000) for d, n in enumerate([81, 41, 21])
    ]


def ids(batch):
    """(dataset, sample index) of each row, read back from its first token."""
    first = batch[:, 0].numpy()
    return list(zip((first // 1_000_000).tolist(), ((first % 1_000_000) // SEQ).tolist()))


def test_packed_windows(shards):
    ds = PackedDataset(shards[0], SEQ)
    assert len(ds) == 81
    np.testing.assert_array_equal(ds.sample(0), np.arange(SEQ + 1))
    np.testing.assert_array_equal(ds.sample(80), np.arange(80 * SEQ, 81 * SEQ + 1))  # the last
    assert ds.sample(3).dtype == np.int64
    with pytest.raises(IndexError):
        ds.sample(81)


def test_seq_len_longer_than_shard(tmp_path):
    prefix = write_shard(str(tmp_path / "tiny"), 50)
    PackedDataset(prefix, 49)
    with pytest.raises(DataError, match=r"tiny.*50 tokens.*seq_len 50"):
        PackedDataset(prefix, 50)


def test_unshuffled_single_dataset_is_the_identity_and_wraps(shards):
    ds = PackedDataset(shards[0], SEQ)
    loader = TokenLoader([ds], [1.0], seed=0, shuffle=False)
    batch = loader.get(0, 81 + 5)
    assert batch.dtype == torch.long and batch.shape == (86, SEQ + 1)
    for g in range(86):
        np.testing.assert_array_equal(batch[g].numpy(), ds.sample(g % 81))


def test_deterministic_per_seed(shards):
    datasets = [PackedDataset(p, SEQ) for p in shards]
    a = TokenLoader(datasets, [3, 2, 1], seed=5).get(100, 50)
    b = TokenLoader([PackedDataset(p, SEQ) for p in shards], [3, 2, 1], seed=5).get(100, 50)
    c = TokenLoader(datasets, [3, 2, 1], seed=6).get(100, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_each_epoch_is_a_new_permutation(shards):
    loader = TokenLoader([PackedDataset(shards[1], SEQ)], [1.0], seed=0)
    epochs = [[i for _, i in ids(loader.get(e * 41, 41))] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(41))  # nothing repeated or skipped
    assert epochs[0] != list(range(41)) and epochs[0] != epochs[1] != epochs[2]


def test_resume_anywhere_gives_the_same_stream(shards):
    def make():
        datasets = [PackedDataset(p, SEQ) for p in shards]
        return TokenLoader(datasets, [0.5, 0.3, 0.2], seed=1, block_size=64)

    loader = make()
    whole = loader.get(0, 300)  # 4+ blocks, several epochs of each dataset
    for k in [0, 1, 63, 64, 65, 81, 200, 299]:
        fresh = make()
        assert torch.equal(torch.cat([loader.get(0, k), fresh.get(k, 300 - k)]), whole)


def test_one_or_two_ranks_see_the_same_global_batches(shards):
    loader = TokenLoader([PackedDataset(p, SEQ) for p in shards], [2, 1, 1], seed=0)
    global_batch, consumed = 12, 0
    for _ in range(20):
        single = loader.get(*rank_slice(consumed, global_batch, 0, 1))
        parts = [loader.get(*rank_slice(consumed, global_batch, r, 2)) for r in range(2)]
        assert torch.equal(torch.cat(parts), single)
        consumed += global_batch
    assert rank_slice(24, 12, 1, 4) == (27, 3)
    with pytest.raises(ValueError, match="global_batch 12.*world size 5"):
        rank_slice(0, 12, 0, 5)


def test_blend_counts_are_exact_per_block(shards):
    weights = [0.6, 0.3, 0.1]
    loader = TokenLoader([PackedDataset(p, SEQ) for p in shards], weights, seed=2)
    counts = apportion(np.array(weights), 4096)
    assert counts.tolist() == [2458, 1229, 409] and counts.sum() == 4096
    assert apportion(np.array([0.2, 0.35, 0.45]), 10).tolist() == [2, 4, 4]  # tie: lower index
    assert apportion(np.array([0.14, 0.43, 0.43]), 7).tolist() == [1, 3, 3]  # largest remainder
    which = np.array([d for d, _ in ids(loader.get(0, 3 * 4096 + 1000))])
    for b in range(3):
        block = which[b * 4096 : (b + 1) * 4096]
        assert np.bincount(block, minlength=3).tolist() == counts.tolist()
    overall = np.bincount(which, minlength=3) / len(which)
    np.testing.assert_allclose(overall, weights, atol=2e-3)
    assert len(set(which[:50])) == 3  # mixed within a block, not one dataset after another


def test_blended_datasets_run_whole_epochs(shards):
    datasets = [PackedDataset(p, SEQ) for p in shards]
    loader = TokenLoader(datasets, [1, 1, 1], seed=4, block_size=30)
    seen = {d: [] for d in range(3)}
    for d, i in ids(loader.get(0, 900)):
        seen[d].append(i)
    for d, order in seen.items():
        n = len(datasets[d])
        for e in range(len(order) // n):  # every full epoch is a permutation of the dataset
            assert sorted(order[e * n : (e + 1) * n]) == list(range(n))


def test_bad_weights_are_named(shards):
    datasets = [PackedDataset(p, SEQ) for p in shards[:2]]
    for bad in [0.0, -1.5, float("nan")]:
        with pytest.raises(DataError, match=f"weight {bad!r}"):
            TokenLoader(datasets, [1.0, bad], seed=0)
    with pytest.raises(DataError, match="weight 1e-05 is too small"):
        TokenLoader(datasets, [1.0, 1e-5], seed=0)
    with pytest.raises(DataError, match="2 datasets but 1 weights"):
        TokenLoader(datasets, [1.0], seed=0)
