"""`unroll data prepare` in its default layout: a corpus tokenized into OUT/{train,valid}.{bin,idx} + meta.json.

The corpus is streamed (data/stream.py) twice: once to count its documents, which the split needs, and once to
tokenize them in worker processes (data/encode_pool.py), written in input order, so memory stays bounded and the
output does not depend on the number of workers. For the same input and tokenizer the shards are token for token
what Megatron's tools/preprocess_data.py writes with --append-eod. A corpus too large to prepare in one go is
better prepared into a directory of shards that survives a crash (data/prepare_dir.py, `--shard-tokens`).

The pieces both layouts share are here too: batching documents, the shard writer, the progress bar.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .encode_pool import encode_in_order
from .errors import DataError
from .shards import indexed_dataset_module
from .stream import Position, listed_files, read_records, source_named
from .tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "valid")
_OUTPUT_NAMES = {f"{split}{ext}" for split in SPLITS for ext in (".bin", ".idx")} | {"meta.json"}
BATCH_DOCS = 256  # documents per batch sent to a worker, at most
BATCH_CHARS = 1 << 20  # characters per batch, about (a longer document is a batch of its own)


def split_documents(n_docs: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices, each sorted: valid gets
    max(1, round(valid_fraction * n_docs)) documents (at most n_docs - 1), chosen by a permutation
    seeded with `seed`."""
    if n_docs < 2:
        raise DataError(f"cannot split {n_docs} document(s) into train and valid by document")
    n_valid = min(n_docs - 1, max(1, round(valid_fraction * n_docs)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def document_batches(records: Iterable[tuple[Position, str]]) -> Iterator[tuple[list[Position], list[str]]]:
    """The non-empty texts of `records` (empty documents are skipped) in batches of at most BATCH_DOCS
    documents or about BATCH_CHARS characters, each beside its documents' positions."""
    positions: list[Position] = []
    texts: list[str] = []
    chars = 0
    for position, text in records:
        if not text:
            continue
        positions.append(position)
        texts.append(text)
        chars += len(text)
        if len(texts) == BATCH_DOCS or chars >= BATCH_CHARS:
            yield positions, texts
            positions, texts, chars = [], [], 0
    if texts:
        yield positions, texts


class ShardWriter:
    """One shard PREFIX.bin/.idx written with megatron-core's IndexedDatasetBuilder: each `add` is one
    document of one sequence (its ids, EOS included)."""

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self._builder = indexed_dataset_module().IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        self.docs = self.tokens = 0
        self.max_id = -1

    def add(self, ids: np.ndarray) -> None:
        import torch

        self._builder.add_item(torch.from_numpy(ids))  # add_item wants a tensor
        self._builder.end_document()
        self.docs += 1
        self.tokens += len(ids)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def finish(self) -> dict:
        """Write the .idx; returns the counts meta.json and the manifest record (max_token_id spares
        check_token_ids a pass over the .bin)."""
        self._builder.finalize(self.prefix + ".idx")
        return {"docs": self.docs, "tokens": self.tokens, "max_token_id": self.max_id}


def progress_bar(enabled: bool | None, *, initial: int = 0):
    """A tqdm bar counting tokens (its rate is tokens/s) on stderr; enabled=None: when stderr is a terminal."""
    from tqdm import tqdm

    on = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(
        disable=not on,
        unit="tok",
        unit_scale=True,
        initial=initial,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def open_tokenizer(tokenizer: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A tokenizer's path opened by load_tokenizer, or a tokenizer already open (e.g. an HF one with the EOS a
    config names) as it is."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def token_dtype(vocab_size: int) -> type:
    """The .bin's dtype: what megatron's tools choose for this vocabulary (uint16 up to 65500 ids, else int32)."""
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


def prepare_shards(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    valid_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 2,
    num_proc: int | None = None,
    text_key: str = "text",
    progress: bool | None = False,
) -> dict:
    """Tokenize `source` (data/stream.py says what it may be) with `tokenizer` (a path, or a tokenizer already
    open) into out_dir/{train,valid}.{bin,idx} and out_dir/meta.json, with `workers` processes (`num_proc`: its
    former name).

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
    workers = num_proc if num_proc is not None else workers
    tokenizer = open_tokenizer(tokenizer)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_replaceable(out_dir)
    files = listed_files(source)
    n_docs = sum(1 for _, text in read_records(files, text_key) if text)
    if n_docs == 0:
        raise DataError(f"empty corpus: {source_named(source)} has no document with text")
    dtype = token_dtype(tokenizer.vocab_size)
    if n_docs > 1:
        is_valid = np.zeros(n_docs, dtype=bool)
        is_valid[split_documents(n_docs, valid_fraction, seed)[1]] = True

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; out_dir should be like any dir
        writers = {split: ShardWriter(os.path.join(tmp, split), dtype) for split in SPLITS}
        batches = document_batches(read_records(files, text_key))
        doc = 0
        with progress_bar(progress) as bar:
            for _, encoded in encode_in_order(tokenizer, batches, workers):
                for ids in encoded.documents():
                    if n_docs == 1:
                        cut = len(ids) - min(len(ids) - 1, max(1, round(valid_fraction * len(ids))))
                        writers["train"].add(ids[:cut])
                        writers["valid"].add(ids[cut:])
                    else:
                        writers["valid" if is_valid[doc] else "train"].add(ids)
                    doc += 1
                bar.update(int(encoded.lengths.sum()))
        counts = {split: writer.finish() for split, writer in writers.items()}
        meta = {
            "format": "megatron indexed dataset; one sequence per document, ending in EOS",
            "source": source_named(source),
            "text_key": text_key,
            "tokenizer": tokenizer.path,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "seed": seed,
            "valid_fraction": valid_fraction,
            "split_within_document": n_docs == 1,
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
