"""Token shards: a corpus tokenized into Megatron's indexed-dataset format (prefix.bin + .idx).

The .bin holds the tokens of every sequence back to back; the .idx holds each sequence's length and
byte offset and, in `document_indices`, where each document's sequences start. prepare_shards
writes one sequence per document, ending in EOS. Megatron's tools/preprocess_data.py may write
several sequences per document (--split-sentences) and may leave out the EOS (no --append-eod);
TokenShard reads both. Megatron's tokenizers may also write ids beyond the sentencepiece vocabulary
(--legacy-tokenizer appends <EOD> and other specials after it): check_token_ids stops a run whose
model has no embedding row for a shard's largest id before it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable

import numpy as np

from .corpus import import_datasets, read_documents
from .errors import DataError
from .indexed_reader import open_indexed
from .tokenizer import Tokenizer

SPLITS = ("train", "valid")
_OUTPUT_NAMES = {f"{split}{ext}" for split in SPLITS for ext in (".bin", ".idx")} | {"meta.json"}


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use: importing megatron.core
    takes seconds and warns that Transformer Engine and Apex (GPU libraries this code never uses)
    are missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def split_documents(n_docs: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices, each sorted: valid gets
    max(1, round(valid_fraction * n_docs)) documents (at most n_docs - 1), chosen by a permutation
    seeded with `seed`."""
    if n_docs < 2:
        raise DataError(f"cannot split {n_docs} document(s) into train and valid by document")
    n_valid = min(n_docs - 1, max(1, round(valid_fraction * n_docs)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def prepare_shards(
    source: str,
    tokenizer_path: str,
    out_dir: str,
    *,
    valid_fraction: float = 0.05,
    seed: int = 0,
    num_proc: int = 2,
    text_key: str = "text",
) -> dict:
    """Tokenize `source` into out_dir/{train,valid}.{bin,idx} and out_dir/meta.json.

    Each document becomes one sequence: its tokens, then EOS. Empty documents are skipped.
    Documents are split into train and valid by `split_documents`; a corpus of ONE document is
    split inside it instead: valid gets its last max(1, round(valid_fraction * n_tokens)) tokens,
    train the rest (so train's single document has no EOS: the text goes on in valid).

    Everything is written into a temporary directory beside out_dir, which then replaces out_dir.
    An existing out_dir is replaced only if it holds nothing but a previous run's outputs.
    Returns {"train": prefix, "valid": prefix, "meta": meta}.
    """
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction {valid_fraction} must be in [0, 1)")
    tokenizer = Tokenizer(tokenizer_path)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_replaceable(out_dir)
    docs = read_documents(source, text_key=text_key)
    tokenized = _tokenize(docs, tokenizer, num_proc)
    dtype = indexed_dataset_module().DType.optimal_dtype(tokenizer.vocab_size)

    if len(tokenized) == 1:
        tokens = np.asarray(tokenized[0]["ids"], dtype=np.int64)
        cut = len(tokens) - min(len(tokens) - 1, max(1, round(valid_fraction * len(tokens))))
        parts: dict[str, Iterable[np.ndarray]] = {"train": [tokens[:cut]], "valid": [tokens[cut:]]}
    else:
        train_idx, valid_idx = split_documents(len(tokenized), valid_fraction, seed)
        parts = {"train": _rows(tokenized, train_idx), "valid": _rows(tokenized, valid_idx)}

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; out_dir should be like any dir
        counts = {s: _write_shard(os.path.join(tmp, s), parts[s], dtype) for s in SPLITS}
        meta = {
            "format": "megatron indexed dataset; one sequence per document, ending in EOS",
            "source": os.fspath(source),
            "text_key": text_key,
            "tokenizer": tokenizer.path,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "seed": seed,
            "valid_fraction": valid_fraction,
            "split_within_document": len(tokenized) == 1,
            **counts,  # "train" / "valid": {"docs": ..., "tokens": ..., "max_token_id": ...}
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: os.path.join(out_dir, split) for split in SPLITS} | {"meta": meta}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_replaceable(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"out_dir {out_dir!r} exists and is not a directory")
    foreign = sorted(set(os.listdir(out_dir)) - _OUTPUT_NAMES) if os.path.isdir(out_dir) else []
    if foreign:
        raise DataError(
            f"out_dir {out_dir!r} holds files prepare_shards did not write ({foreign[:5]}); "
            "it would replace the whole directory: choose a new or empty one"
        )


def _replace_dir(tmp: str, out_dir: str) -> None:
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    name, parent = os.path.basename(out_dir), os.path.dirname(out_dir)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(out_dir, os.path.join(old, name))  # open mmaps keep their (then unlinked) files
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


_worker_tokenizers: dict[str, Tokenizer] = {}


def _encode_batch(batch: dict, model_path: str, eos_id: int) -> dict:
    """datasets.map function. Top-level and given a path, not a Tokenizer, so that it pickles for
    worker processes under any start method; each worker loads the model once."""
    tokenizer = _worker_tokenizers.get(model_path)
    if tokenizer is None:
        tokenizer = _worker_tokenizers[model_path] = Tokenizer(model_path)
    texts = [t for t in batch["text"] if t]
    return {"ids": [ids + [eos_id] for ids in tokenizer.encode_batch(texts)]}


def _tokenize(docs, tokenizer: Tokenizer, num_proc: int):
    datasets = import_datasets()
    return docs.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 and len(docs) > 1 else None,
        fn_kwargs={"model_path": tokenizer.path, "eos_id": tokenizer.eos_id},
        remove_columns=["text"],
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
        # The cache key would be the model's path, not its contents: a retrained model at the same
        # path must not reuse the old tokenization.
        load_from_cache_file=False,
        desc="tokenize",
    )


def _rows(tokenized, indices: np.ndarray) -> Iterable[np.ndarray]:
    for batch in tokenized.select(indices).with_format("numpy").iter(batch_size=256):
        yield from batch["ids"]


def _write_shard(prefix: str, docs: Iterable[np.ndarray], dtype: type) -> dict:
    import torch

    builder = indexed_dataset_module().IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    max_id = -1
    for ids in docs:
        ids = np.asarray(ids)
        builder.add_item(torch.from_numpy(ids))  # add_item wants a tensor
        builder.end_document()
        n_docs += 1
        n_tokens += len(ids)
        max_id = max(max_id, int(ids.max())) if len(ids) else max_id
    builder.finalize(prefix + ".idx")
    # max_token_id spares check_token_ids a pass over the .bin
    return {"docs": n_docs, "tokens": n_tokens, "max_token_id": max_id}


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
    """(path, content) of the meta.json prepare_shards writes beside its shards; content None without one."""
    path = os.path.join(os.path.dirname(os.path.abspath(shard.prefix)), "meta.json")
    if not os.path.isfile(path):
        return path, None
    with open(path) as f:
        return path, json.load(f)


def check_vocab(prefix_or_shard: str | TokenShard, vocab_size: int, tokenizer: Tokenizer | None = None) -> None:
    """Stop a run whose tokenizer does not match its shard: the shard's dtype must hold the tokenizer's ids
    (up to vocab_size - 1 without a tokenizer), and the meta.json beside it (written by prepare_shards), if
    any, must name that vocabulary size and, when `tokenizer` is given, this tokenizer's contents. The model
    may have more rows than the tokenizer has ids (a padded vocabulary): check_token_ids checks the ids."""
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
    """(smallest, largest) token id of a shard and where that came from ("meta.json" or "scan").

    A shard prepare_shards wrote has its largest id in the meta.json beside it (used when that meta's
    document and token counts are this shard's). Any other shard (Megatron's preprocess_data.py) is
    read once per process: a vectorised min/max over the .bin, one memory-mapped window of _SCAN_CHUNK
    tokens at a time, so memory stays bounded (one 32-64 MiB window). Measured on a 2-core machine with a
    1 GiB shard (uint16 and int32) in the page cache: 0.1-0.35 s per GB, min and max together; a cold read
    goes at the storage's speed. Nothing is written beside the shard (shards may be read-only): the result
    is kept in this process only."""
    _, meta = _meta_beside(shard)
    recorded = (meta or {}).get(os.path.basename(shard.prefix)) or {}
    if "max_token_id" in recorded and (recorded.get("docs"), recorded.get("tokens")) == (shard.n_docs, shard.n_tokens):
        return 0, int(recorded["max_token_id"]), "meta.json"
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
        where = " (per the meta.json beside it)" if source == "meta.json" else ""
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
