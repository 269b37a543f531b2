"""A reader of Megatron's indexed-dataset files (`prefix.idx` + `prefix.bin`, the MMIDIDX version 1 format),
memory-mapped with numpy.

Megatron's own `IndexedDatasetBuilder` writes our shards; reading them back through
`megatron.core.datasets.indexed_dataset` would import `megatron.core` as a whole (its tensor-parallel layers,
fusions, inference contexts, wandb: seconds of CPU and warnings about Transformer Engine and Apex) in every
rank of every run start, for what is a header and three arrays. The layout read here is the one Megatron's
`_IndexReader` reads; tests compare this reader with Megatron's on the same files.

    magic b"MMIDIDX\\x00\\x00" | version <Q (1) | dtype code <B | sequence count <Q | document count <Q
    | sequence lengths int32[sequences] | sequence pointers int64[sequences] (byte offsets into .bin)
    | document indices int64[documents] (the first sequence of each document, then the total)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count

# megatron.core.datasets.indexed_dataset.DType: code → token dtype
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


@dataclass(frozen=True)
class IndexedFiles:
    """One shard's index arrays (read-only views of the mapped .idx) and its mapped token file."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [sequences]
    sequence_pointers: np.ndarray  # int64 [sequences], byte offsets into `tokens`' file
    document_indices: np.ndarray  # int64 [documents + 1]
    tokens: np.ndarray  # the .bin as a flat array of `dtype`

    def sequence(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to the sequence's end when length is None); like
        Megatron's `IndexedDataset.get`, a length past the end reads on into the following bytes."""
        first = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self.tokens[first : first + n]


def read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequences, documents) from the header of `idx_path`; DataError naming the file when it is
    not a version-1 Megatron index."""
    with open(idx_path, "rb") as f:
        head = f.read(len(MAGIC) + _HEADER.size)
    if len(head) == len(MAGIC) + _HEADER.size and head.startswith(MAGIC):
        version, code, n_seq, n_docs = _HEADER.unpack(head[len(MAGIC) :])
        if version == 1 and code in DTYPE_CODES:
            return np.dtype(DTYPE_CODES[code]), n_seq, n_docs
    raise DataError(f"not a Megatron indexed-dataset index (bad header): {idx_path!r}")


def open_indexed(prefix: str) -> IndexedFiles:
    """Maps `prefix.idx` and `prefix.bin`. DataError naming the file for a bad header, an index shorter than its
    header says, or a token file too short for the sequences the index points at."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    dtype, n_seq, n_docs = read_header(idx_path)
    offset = len(MAGIC) + _HEADER.size
    need = offset + n_seq * (4 + 8) + n_docs * 8
    if os.path.getsize(idx_path) < need:
        raise DataError(
            f"corrupt token shard index {idx_path!r}: {os.path.getsize(idx_path)} bytes, header says {need}"
        )
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=offset + lengths.nbytes)
    documents = np.frombuffer(index, dtype=np.int64, count=n_docs, offset=offset + lengths.nbytes + pointers.nbytes)
    size = os.path.getsize(bin_path)
    if size == 0:
        raise DataError(f"token shard file is empty: {bin_path!r}")
    end = int(np.max(pointers + lengths.astype(np.int64) * dtype.itemsize)) if n_seq else 0
    if size < end:
        raise DataError(f"token shard file is truncated: {bin_path!r} has {size} bytes, its index needs {end}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,))
    return IndexedFiles(dtype, lengths, pointers, documents, tokens)
