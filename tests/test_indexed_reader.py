"""data/indexed_reader.py reads what Megatron's IndexedDataset reads, for every dtype its builder writes."""

import numpy as np
import pytest

from unroll.data.errors import DataError
from unroll.data.indexed_reader import DTYPE_CODES, open_indexed
from unroll.data.shards import indexed_dataset_module


@pytest.mark.parametrize("dtype", [np.dtype(d) for d in DTYPE_CODES.values()], ids=str)
def test_reader_agrees_with_megatrons_indexed_dataset(tmp_path, dtype):
    module = indexed_dataset_module()
    assert {module.DType.code_from_dtype(np.dtype(d).type) for d in DTYPE_CODES.values()} == set(DTYPE_CODES)
    rng = np.random.default_rng(int(dtype.num))
    prefix = str(tmp_path / "shard")
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype.type)
    for _ in range(9):
        lengths = [int(n) for n in rng.integers(0, 7, size=rng.integers(0, 4))]
        builder.add_document(rng.integers(0, 100, size=sum(lengths)), lengths)
    builder.finalize(prefix + ".idx")

    ours, theirs = open_indexed(prefix), module.IndexedDataset(prefix, mmap=True)
    assert ours.dtype == np.dtype(theirs.index.dtype)
    np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(theirs)):
        np.testing.assert_array_equal(ours.sequence(i), theirs.get(i))
        n = int(theirs.sequence_lengths[i])
        if n > 1:
            np.testing.assert_array_equal(ours.sequence(i, 1, n - 1), theirs.get(i, 1, n - 1))


def test_a_short_index_or_token_file_is_named(tmp_path):
    module = indexed_dataset_module()
    prefix = str(tmp_path / "shard")
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.arange(50), [20, 30])
    builder.finalize(prefix + ".idx")
    idx, tokens = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()

    open(prefix + ".bin", "wb").write(tokens[:-2])
    with pytest.raises(DataError, match=r"truncated: .*shard\.bin.* 98 bytes, its index needs 100"):
        open_indexed(prefix)
    open(prefix + ".bin", "wb").write(tokens)
    open(prefix + ".idx", "wb").write(idx[:-8])
    with pytest.raises(DataError, match=r"corrupt token shard index .*shard\.idx"):
        open_indexed(prefix)
    open(prefix + ".idx", "wb").write(b"MMIDIDX\x00\x00" + idx[9:17] + b"\x63" + idx[18:])
    with pytest.raises(DataError, match=r"bad header.*shard\.idx"):
        open_indexed(prefix)
