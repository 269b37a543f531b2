"""Token shards: a corpus tokenized into Megatron's indexed-dataset format (prefix.bin + .idx).

The .bin holds the tokens of every sequence back to back; the .idx holds each sequence's length and
byte offset and, in `document_indices`, where each document's sequences start. `unroll data prepare`
(data/prepare.py, data/prepare_dir.py) writes one sequence per document, ending in EOS. Megatron's
tools/preprocess_data.py may write several sequences per document (--split-sentences) and may leave
out the EOS (no --append-eod); TokenShard reads both. Megatron's tokenizers may also write ids beyond
the sentencepiece vocabulary (--legacy-tokenizer appends <EOD> and other specials after it):
check_token_ids stops a run whose model has no embedding row for a shard's largest id before it starts.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import DataError
from .indexed_reader import open_indexed
from .manifest import MANIFEST, records_by_name
from .tokenizer import Tokenizer


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use: importing megatron.core
    takes seconds and warns that Transformer Engine and Apex (GPU libraries this code never uses)
    are missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class TokenShard:
    """A read-only, memory-mapped token shard `prefix.bin`/`prefix.idx`.

    Its token stream is every document's tokens in order; `tokens(start, length)` reads any span of
    it, `doc(i)` one document (the concatenation of its sequences)."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        for ext in (".idx", ".bin"):
            if not os.path.isfile(self.prefix + ext):
                raise DataError(f"token shard file missing: {self.prefix + ext!r}")
        self._open()

    def _open(self) -> None:
        idx_path = self.prefix + ".idx"
        self._files = open_indexed(self.prefix)
        self._flat = self._files.tokens.view(np.ndarray)  # indexing a plain view skips np.memmap's per-call wrapping
        lengths = self._files.sequence_lengths.astype(np.int64)
        self._seq_start = np.concatenate([[0], np.cumsum(lengths)])
        self._doc_index = self._files.document_indices
        self._doc_starts: np.ndarray | None = None
        if len(self._doc_index) == 0 or self._doc_index[0] != 0 or np.any(np.diff(self._doc_index) < 0):
            raise DataError(f"corrupt token shard index {idx_path!r}: bad document indices")
        if self._doc_index[-1] != len(lengths):
            raise DataError(f"corrupt token shard index {idx_path!r}: document indices do not end at its sequences")
        # Every writer we know (IndexedDatasetBuilder, add_index merges) puts sequences back to
        # back; then a span crossing sequences is one read. Else tokens() goes sequence by sequence.
        self._contiguous = bool(
            np.array_equal(self._files.sequence_pointers, self._seq_start[:-1] * self.dtype.itemsize)
        )

    def __getstate__(self) -> dict:  # for DataLoader workers: reopen the mmap, don't copy it
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    @property
    def n_docs(self) -> int:
        return len(self._doc_index) - 1

    @property
    def n_tokens(self) -> int:
        return int(self._seq_start[-1])

    @property
    def dtype(self) -> np.dtype:
        return self._files.dtype

    def doc(self, i: int) -> np.ndarray:
        """Document i's tokens (int64)."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.prefix!r} ({self.n_docs} documents)")
        first, last = self._seq_start[self._doc_index[i]], self._seq_start[self._doc_index[i + 1]]
        return self.tokens(int(first), int(last - first))

    def document_starts(self) -> np.ndarray:
        """The token offsets at which the shard's documents begin, ascending (from the index's document table,
        never from the tokens: a corpus may hold its EOS id inside a document). An empty document begins where
        the next one does."""
        if self._doc_starts is None:
            self._doc_starts = self._seq_start[self._doc_index[:-1]]
        return self._doc_starts

    def starts_in(self, start: int, length: int) -> np.ndarray:
        """bool [length]: True at position t where a document begins at token start + t."""
        starts = self.document_starts()
        lo, hi = np.searchsorted(starts, [start, start + length])
        out = np.zeros(length, dtype=bool)
        out[starts[lo:hi] - start] = True
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: tokens [s, s + length) for each s of `starts`; where the sequences are back
        to back (every writer we know), token position p is the .bin's element p, so the windows are slices of it."""
        return self.windows_in_range(self._window_starts(starts, length), length)

    def starts_in_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """bool [len(starts), length]: starts_in(s, length) for each s of `starts`, in one pass."""
        return self.starts_in_windows_in_range(self._window_starts(starts, length), length)

    def windows_in_range(self, starts: np.ndarray, length: int) -> np.ndarray:
        """windows() of int64 starts known to be in range (the loader's, which come from valid sample indices)."""
        if not starts.size:
            return np.zeros((0, length), dtype=np.int64)
        if not self._contiguous:
            return np.stack([self.tokens(int(s), length) for s in starts])
        return self._flat[starts[:, None] + np.arange(length)].astype(np.int64)

    def starts_in_windows_in_range(self, starts: np.ndarray, length: int) -> np.ndarray:
        """starts_in_windows() of int64 starts known to be in range."""
        doc = self.document_starts()
        lo, hi = doc.searchsorted(starts), doc.searchsorted(starts + length)
        counts = hi - lo
        row = np.repeat(np.arange(len(starts)), counts)
        # the document starts of each window, lo[w] .. hi[w] - 1, laid end to end
        nth = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
        out = np.zeros((len(starts), length), dtype=bool)
        out[row, doc[nth] - starts[row]] = True
        return out

    def window_into(self, start: int, tokens: np.ndarray, starts: np.ndarray | None = None) -> None:
        """One window of len(tokens) tokens from `start` (known to be in range) written into `tokens` (int64) and, if
        given, its document starts into `starts` (bool, all False on entry): a loader batch drawn from many shards
        reads a row or two of each, where a gather's fixed cost is most of the work."""
        length = len(tokens)
        if self._contiguous:
            tokens[:] = self._flat[start : start + length]
        else:
            tokens[:] = self.tokens(start, length)
        if starts is not None:
            doc = self.document_starts()
            starts[doc[doc.searchsorted(start) : doc.searchsorted(start + length)] - start] = True

    def _window_starts(self, starts: np.ndarray, length: int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if starts.size and (starts.min() < 0 or starts.max() + length > self.n_tokens):
            raise IndexError(f"windows of {length} tokens out of range for {self.prefix!r} ({self.n_tokens} tokens)")
        return starts

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the shard's token stream, as int64."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(
                f"tokens [{start}, {start + length}) out of range for {self.prefix!r} ({self.n_tokens} tokens)"
            )
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        seq = int(np.searchsorted(self._seq_start, start, side="right")) - 1
        offset = start - int(self._seq_start[seq])
        if self._contiguous:
            # get() reads `length` tokens from the sequence's offset on, past its end if asked:
            # sequences are back to back, so that is the span across sequences and documents.
            return self._files.sequence(seq, offset, length).astype(np.int64)
        out, filled = np.empty(length, dtype=np.int64), 0
        while filled < length:
            n = min(int(self._files.sequence_lengths[seq]) - offset, length - filled)
            if n > 0:
                out[filled : filled + n] = self._files.sequence(seq, offset, n)
                filled += n
            seq, offset = seq + 1, 0
        return out

    def __repr__(self) -> str:
        return f"TokenShard({self.prefix!r}, docs={self.n_docs}, tokens={self.n_tokens}, {self.dtype})"


def _meta_beside(shard: TokenShard) -> tuple[str, dict | None]:
    """(path, content) of what `unroll data prepare` wrote beside a shard: the manifest.json of a directory of
    shards (each shard's record under its name) or the meta.json of a train/valid pair; content None without
    either."""
    folder = os.path.dirname(os.path.abspath(shard.prefix))
    try:
        manifest = records_by_name(folder)
    except DataError:  # a manifest.json of another tool's: not ours to check against
        manifest = None
    if manifest is not None:
        return os.path.join(folder, MANIFEST), manifest
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return path, None
    with open(path) as f:
        return path, json.load(f)


def check_vocab(prefix_or_shard: str | TokenShard, vocab_size: int, tokenizer: Tokenizer | None = None) -> None:
    """Stop a run whose tokenizer does not match its shard: the shard's dtype must hold the tokenizer's ids
    (up to vocab_size - 1 without a tokenizer), and the meta.json or manifest.json beside it (written by
    `unroll data prepare`), if any, must name that vocabulary size and, when `tokenizer` is given, this
    tokenizer's contents. The model may have more rows than the tokenizer has ids (a padded vocabulary):
    check_token_ids checks the ids."""
    shard = prefix_or_shard
    if not isinstance(shard, TokenShard):
        shard = TokenShard(shard)
    n_ids = tokenizer.vocab_size if tokenizer is not None else vocab_size
    top = np.iinfo(shard.dtype).max
    if n_ids - 1 > top:
        raise DataError(
            f"token shard {shard.prefix!r} stores {shard.dtype} (ids up to {top}): "
            f"it cannot hold a vocabulary of vocab_size {n_ids}"
        )
    meta_path, meta = _meta_beside(shard)
    if meta is not None:
        if meta.get("vocab_size", n_ids) != n_ids:
            raise DataError(
                f"token shard {shard.prefix!r} was tokenized with vocab_size {meta['vocab_size']} "
                f"({meta.get('tokenizer')}, per {meta_path}), not vocab_size {n_ids}"
            )
        made_by = meta.get("tokenizer_sha256")
        if tokenizer is not None and made_by and made_by != tokenizer.sha256:
            raise DataError(
                f"token shard {shard.prefix!r} was tokenized by another tokenizer "
                f"({meta.get('tokenizer')}, per {meta_path}) than {tokenizer.path!r}"
            )


_SCAN_CHUNK = 1 << 24  # tokens per mapped window: 32-64 MiB for 2-4 byte ids, whatever the shard's size
_scanned: dict[tuple, tuple[int, int]] = {}  # (file, inode, size, mtime) -> (smallest, largest id)


def token_id_range(shard: TokenShard) -> tuple[int, int, str]:
    """(smallest, largest) token id of a shard and where that came from: "meta.json", "manifest.json" or
    "scan".

    A shard `unroll data prepare` wrote has its largest id in the meta.json or manifest.json beside it (used
    when the document and token counts recorded there are this shard's). Any other shard (Megatron's
    preprocess_data.py) is read once per process: a vectorised min/max over the .bin, one memory-mapped window
    of _SCAN_CHUNK tokens at a time, so memory stays bounded (one 32-64 MiB window). Measured on a 2-core
    machine with a 1 GiB shard (uint16 and int32) in the page cache: 0.1-0.35 s per GB, min and max together;
    a cold read goes at the storage's speed. Nothing is written beside the shard (shards may be read-only):
    the result is kept in this process only."""
    meta_path, meta = _meta_beside(shard)
    recorded = (meta or {}).get(os.path.basename(shard.prefix)) or {}
    if "max_token_id" in recorded and (recorded.get("docs"), recorded.get("tokens")) == (shard.n_docs, shard.n_tokens):
        return 0, int(recorded["max_token_id"]), os.path.basename(meta_path)
    path = os.path.realpath(shard.prefix + ".bin")
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _scanned:
        _scanned[key] = _scan_ids(shard, path)
    return (*_scanned[key], "scan")


def _scan_ids(shard: TokenShard, path: str) -> tuple[int, int]:
    if shard.n_tokens == 0:
        return 0, -1
    lo, hi = np.iinfo(shard.dtype).max, -1
    if not shard._contiguous:  # no writer we know leaves gaps between sequences: read each one alone
        for i in range(len(shard._files.sequence_lengths)):
            ids = shard._files.sequence(i)
            if len(ids):
                lo, hi = min(lo, int(ids.min())), max(hi, int(ids.max()))
        return lo, hi
    for start in range(0, shard.n_tokens, _SCAN_CHUNK):
        n = min(_SCAN_CHUNK, shard.n_tokens - start)
        window = np.memmap(path, dtype=shard.dtype, mode="r", offset=start * shard.dtype.itemsize, shape=(n,))
        lo, hi = min(lo, int(window.min())), max(hi, int(window.max()))
        del window  # unmapped: its pages leave this process's memory
    return lo, hi


def check_token_ids(shards: Iterable[str | TokenShard], vocab_size: int) -> int:
    """Stop before training when a shard holds a token id the model has no embedding row for (an id
    >= model.vocab_size, or a negative one), naming the shard file, the id and the fix. Returns the
    largest id over all `shards` (prefixes or TokenShards)."""
    largest = -1
    for shard in shards:
        if not isinstance(shard, TokenShard):
            shard = TokenShard(shard)
        lo, hi, source = token_id_range(shard)
        where = f" (per the {source} beside it)" if source != "scan" else ""
        if lo < 0:
            raise DataError(
                f"token shard {shard.prefix + '.bin'!r} holds token id {lo}: token ids cannot be "
                f"negative (not a shard of token ids?)"
            )
        if hi >= vocab_size:
            padded = -(-(hi + 1) // 64) * 64
            raise DataError(
                f"token shard {shard.prefix + '.bin'!r} holds token id {hi}{where}, but model.vocab_size is "
                f"{vocab_size}: the model has no embedding row for it; set model.vocab_size to at least "
                f"{hi + 1} (e.g. model.vocab_size={padded}, a multiple of 64)"
            )
        largest = max(largest, hi)
    return largest


def __getattr__(name: str) -> Any:
    """prepare_shards, split_documents and SPLITS moved to data/prepare.py (which imports this module); they are
    still found here, where callers import them from."""
    if name in ("prepare_shards", "split_documents", "SPLITS"):
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
