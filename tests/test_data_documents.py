"""Where documents begin in each window: from the shard's document index, checked against a brute-force walk of the
documents for any window, blend, epoch and rank split, and with EOS ids inside documents."""

import numpy as np
import pytest

from unroll.data.loader import PackedDataset, TokenLoader, rank_slice
from unroll.data.shards import TokenShard, indexed_dataset_module

EOS = 2


def write_shard(prefix, docs):
    """docs: per document a list of sequences (token lists); a document may have no sequences at all."""
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for sequences in docs:
        builder.add_document([t for s in sequences for t in s], [len(s) for s in sequences])
    builder.finalize(prefix + ".idx")
    return TokenShard(prefix)


def random_docs(seed, n=40):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sequences = [list(rng.integers(3, 300, size=rng.integers(1, 9))) for _ in range(rng.integers(0, 4))]
        for s in sequences:  # EOS inside documents too: boundaries must not come from it
            if rng.random() < 0.3:
                s[rng.integers(0, len(s))] = EOS
        docs.append(sequences)
    return docs


def brute_force_starts(docs):
    """bool over the whole token stream: True at each document's first token."""
    flags = []
    for sequences in docs:
        n = sum(len(s) for s in sequences)
        flags += [True] + [False] * (n - 1) if n else []
    return np.array(flags, dtype=bool)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 32])
def test_every_window_marks_exactly_the_documents_that_begin_in_it(tmp_path, seq_len):
    docs = random_docs(seq_len)
    shard = write_shard(str(tmp_path / "s"), docs)
    truth = brute_force_starts(docs)
    ds = PackedDataset(shard, seq_len)
    for i in range(ds.n_samples):
        np.testing.assert_array_equal(ds.starts(i), truth[i * seq_len : i * seq_len + seq_len + 1], err_msg=f"{i}")
    assert truth.sum() == sum(1 for d in docs if any(len(s) for s in d))


def test_a_document_at_a_windows_first_and_last_token(tmp_path):
    # seq_len 4: windows [0, 5), [4, 9), ...; documents begin at 0, 4 (a window's first token and the previous
    # window's last, its target-only token), 5 and 9
    docs = [[[10, 11, 12, 13]], [[14]], [[15, 16], [17, 18]], [], [[19, 20, 21, 22]]]
    ds = PackedDataset(write_shard(str(tmp_path / "s"), docs), 4)
    assert ds.starts(0).tolist() == [True, False, False, False, True]
    assert ds.starts(1).tolist() == [True, True, False, False, False]
    assert ds.starts(2).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("shuffle", [True, False])
def test_blended_loader_keeps_starts_beside_their_tokens_past_an_epoch_and_across_ranks(tmp_path, shuffle):
    docs_a, docs_b = random_docs(1, 60), random_docs(2, 25)
    shards = [write_shard(str(tmp_path / "a"), docs_a), write_shard(str(tmp_path / "b"), docs_b)]
    truths = [brute_force_starts(docs_a), brute_force_starts(docs_b)]
    seq_len = 8
    datasets = [PackedDataset(s, seq_len) for s in shards]
    loader = TokenLoader(datasets, [0.7, 0.3], seed=5, shuffle=shuffle, block_size=16)
    total = 3 * sum(len(d) for d in datasets)  # several epochs of the smaller dataset
    tokens, starts = loader.get_with_starts(0, total)
    np.testing.assert_array_equal(tokens.numpy(), loader.get(0, total).numpy())
    which, index = loader.locate(np.arange(total))
    for row, (d, i) in enumerate(zip(which, index)):
        np.testing.assert_array_equal(starts[row].numpy(), truths[d][i * seq_len : i * seq_len + seq_len + 1])
    for world in (1, 2):  # resuming on another number of ranks reads the same samples' starts
        for rank in range(world):
            first, count = rank_slice(24, 8, rank, world)
            np.testing.assert_array_equal(loader.get_with_starts(first, count)[1], starts[first : first + count])


def test_starts_follow_the_index_not_the_eos_token(tmp_path):
    docs = [[[5, EOS, 6, EOS]], [[7, 8, EOS]]]  # EOS inside and at the end of documents
    ds = PackedDataset(write_shard(str(tmp_path / "s"), docs), 6)
    assert ds.starts(0).tolist() == [True, False, False, False, True, False, False]


@pytest.mark.parametrize("contiguous", [True, False])
def test_windows_read_in_one_gather_or_row_by_row_equal_the_stream(tmp_path, contiguous):
    # a loader reads a dataset's rows of a batch in one gather (windows) or, when it has only a few of them, row by
    # row into the batch (window_into): both against the stream and the brute-force starts
    docs = random_docs(7, 80)
    shard = write_shard(str(tmp_path / "s"), docs)
    shard._contiguous = contiguous  # also the sequence-by-sequence path of shards with gaps
    stream = np.concatenate([np.concatenate(d) for d in docs if d]).astype(np.int64)
    truth = brute_force_starts(docs)
    rng = np.random.default_rng(0)
    for rows in (1, 2, 5, 30):
        starts = rng.integers(0, len(stream) - 11, size=rows)
        expected_tokens = np.stack([stream[s : s + 11] for s in starts])
        expected_starts = np.stack([truth[s : s + 11] for s in starts])
        np.testing.assert_array_equal(shard.windows(starts, 11), expected_tokens)
        np.testing.assert_array_equal(shard.starts_in_windows(starts, 11), expected_starts)
        tokens, flags = np.full((rows, 11), -1, dtype=np.int64), np.zeros((rows, 11), dtype=bool)
        for row, s in enumerate(starts):
            shard.window_into(int(s), tokens[row], flags[row])
        np.testing.assert_array_equal(tokens, expected_tokens)
        np.testing.assert_array_equal(flags, expected_starts)
    assert shard.windows(np.array([], dtype=np.int64), 11).shape == (0, 11)
    with pytest.raises(IndexError, match="out of range"):
        shard.windows(np.array([len(stream) - 10]), 11)


def test_a_blend_of_many_datasets_reads_row_by_row_the_same_samples(tmp_path):
    # 40 datasets, 32 samples a batch: most datasets give a batch a row or two (read row by row), one dataset
    # weighted up gives it many (one gather); every row against its dataset's own sample and starts
    shards = [write_shard(str(tmp_path / f"s{i}"), random_docs(100 + i, 30)) for i in range(40)]
    datasets = [PackedDataset(s, 6) for s in shards]
    loader = TokenLoader(datasets, [20.0] + [1.0] * 39, seed=3, block_size=64)
    for start in (0, 32, 1000):
        tokens, starts = loader.get_with_starts(start, 32)
        which, index = loader.locate(np.arange(start, start + 32))
        rows_per_dataset = np.bincount(which)
        assert rows_per_dataset.max() > 4 and 0 < rows_per_dataset[rows_per_dataset > 0].min() <= 4  # both paths
        for row, (d, i) in enumerate(zip(which, index)):
            np.testing.assert_array_equal(tokens[row].numpy(), datasets[d].sample(int(i)))
            np.testing.assert_array_equal(starts[row].numpy(), datasets[d].starts(int(i)))
        np.testing.assert_array_equal(loader.get(start, 32).numpy(), tokens.numpy())
