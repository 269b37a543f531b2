"""Corpus files read as a stream of documents, in memory that does not grow with the corpus, from any position.

Sources are read one after another in the order given; each is `bundled:shakespeare`, a file, a directory (its
corpus files, sorted; other and hidden files are ignored) or a glob (sorted). A file's name gives its format:

  .txt            one document per file, read whole (universal newlines, as Python's `open` reads text)
  .jsonl, .json   one document per line: field `text_key` of a JSON object; blank lines are skipped. A .json
                  file holding one JSON array of objects is read whole instead (an array cannot be streamed).
  .parquet        one document per row of column `text_key`, read a batch of rows of one row group at a time

and .txt/.jsonl/.json may be compressed: NAME.gz (gzip) or NAME.zst (zstandard, every frame). Null texts read
as empty documents. One source holds one format (compressed or not); several sources may differ.

A position (file, record) counts every record (a JSON line, a row, a .txt file), empty ones too. A reader
started at a position yields what a reader started at (0, 0) yields from there on, and gets there without
decoding what comes before it: earlier files are not opened, earlier JSON lines are not parsed, earlier
parquet row groups are not read. Resuming a preparation needs this.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from .corpus import bundled_files, resolve_files
from .errors import DataError

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# every name a directory is searched for; parquet compresses inside, so it has no compressed variant
SUFFIXES = sorted(FORMATS) + [f + c for f in FORMATS if f != ".parquet" for c in COMPRESSIONS]

_PARQUET_ROWS = 1024  # rows decoded at a time


@dataclass(frozen=True)
class CorpusFile:
    path: str
    format: str  # "text" | "json" | "parquet"
    compression: str  # "" | "gzip" | "zstd"
    size: int  # bytes on disk, and the modification time: what a resumed preparation compares
    mtime_ns: int


class Position(NamedTuple):
    file: int  # index into the list of CorpusFiles
    record: int  # records of that file before this one


START = Position(0, 0)


def file_format(name: str) -> tuple[str, str] | None:
    """(format, compression) of a file name, None if it is not a corpus file."""
    base, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext, "")
    if compression:
        base, ext = os.path.splitext(base)
    fmt = FORMATS.get(ext)
    if fmt is None or (fmt == "parquet" and compression):
        return None
    return fmt, compression


def corpus_files(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CorpusFile]:
    """The files of `sources` (one or several), in reading order, with their format, size and mtime."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no corpus source given")
    out: list[CorpusFile] = []
    for source in [os.fspath(s) for s in sources]:
        if source.startswith("bundled:"):
            paths = bundled_files(source)
        else:
            paths = resolve_files(source, SUFFIXES)
        formats = {}
        for path in paths:
            found = file_format(path)
            if found is None:
                raise DataError(f"unsupported file type in {source!r}: {path!r} (supported: {SUFFIXES})")
            formats[path] = found
        kinds = {fmt for fmt, _ in formats.values()}
        if len(kinds) > 1:
            raise DataError(f"{source!r} mixes file formats {sorted(kinds)}: use one format per source")
        for path, (fmt, compression) in formats.items():
            st = os.stat(path)
            out.append(CorpusFile(path, fmt, compression, st.st_size, st.st_mtime_ns))
    return out


def listed_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CorpusFile]:
    """corpus_files(source), said on stderr (one line, before the wait) by every command that reads a corpus:
    `data prepare` and `data tokenizer`."""
    files = corpus_files(source)
    named = source_named(source)
    print(f"reading {len(files)} file(s) of {named if isinstance(named, str) else ' '.join(named)}", file=sys.stderr)
    return files


def source_named(source: str | os.PathLike | Sequence[str | os.PathLike]) -> str | list[str]:
    """The source as the user gave it: one path or glob, or a list of them."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return [os.fspath(s) for s in source]


def read_records(
    files: Sequence[CorpusFile], text_key: str = "text", start: Position = START
) -> Iterator[tuple[Position, str]]:
    """(position, text) of every record of `files` from `start` on, empty texts included."""
    for i in range(start.file, len(files)):
        skip = start.record if i == start.file else 0
        for r, text in enumerate(_records(files[i], text_key, skip), skip):
            yield Position(i, r), text


def nonempty_texts(files: Sequence[CorpusFile], text_key: str, source: str) -> Iterator[str]:
    """The non-empty texts of `files`; DataError naming `source` when there are none (checked before the first
    is yielded, so a tokenizer trainer never starts on nothing)."""
    texts = (text for _, text in read_records(files, text_key) if text)
    first = next(texts, None)
    if first is None:
        raise DataError(f"empty corpus: {source!r} holds no text")
    yield first
    yield from texts


def _records(f: CorpusFile, text_key: str, skip: int) -> Iterator[str]:
    if f.size == 0:  # holds no document (and is no valid gzip, zstd or parquet file)
        return
    if f.format == "parquet":
        yield from _parquet_records(f, text_key, skip)
        return
    import zstandard  # here: its errors are named below

    try:
        with _open_binary(f) as stream:
            if f.format == "text":
                if skip == 0:
                    yield io.TextIOWrapper(stream, encoding="utf-8").read()
            else:
                yield from _json_records(f, stream, text_key, skip)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {f.path!r}: {type(e).__name__}: {e}") from None


def _open_binary(f: CorpusFile) -> BinaryIO:
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")  # type: ignore[return-value]  # a GzipFile is a binary file
    if f.compression == "zstd":
        import zstandard

        raw = open(f.path, "rb")
        # read_across_frames: files written by pzstd or concatenated are several frames
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]  # a raw stream: it has readinto
    return open(f.path, "rb")


def _json_records(f: CorpusFile, stream: BinaryIO, text_key: str, skip: int) -> Iterator[str]:
    record = 0
    for lineno, line in enumerate(stream, 1):  # split on b"\n" only: JSON strings may hold U+2028 and the like
        if not line.strip():
            continue
        if record == 0 and line.lstrip().startswith(b"["):
            yield from _json_array(f, line + stream.read(), text_key, skip)
            return
        if record >= skip:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f.path!r} line {lineno} is not JSON: {e}") from None
            yield _text_of(value, f, text_key, f"line {lineno}")
        record += 1


def _json_array(f: CorpusFile, data: bytes, text_key: str, skip: int) -> Iterator[str]:
    try:
        values = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{f.path!r} is neither JSON lines nor a JSON array: {e}") from None
    for i in range(skip, len(values)):
        yield _text_of(values[i], f, text_key, f"record {i}")


def _text_of(value: object, f: CorpusFile, text_key: str, where: str) -> str:
    if not isinstance(value, dict) or text_key not in value:
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise DataError(f"text key {text_key!r} not found in {f.path!r} ({where}): it has {found}")
    text = value[text_key]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"text key {text_key!r} in {f.path!r} ({where}) holds {type(text).__name__}, not a string")
    return text


def _parquet_records(f: CorpusFile, text_key: str, skip: int) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"cannot read parquet file {f.path!r}: {e}") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"text key {text_key!r} not found in {f.path!r}: columns found are {schema.names}")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"text key {text_key!r} in {f.path!r} holds {kind}, not strings")
    group, rows_before = 0, 0
    while group < pf.num_row_groups and rows_before + pf.metadata.row_group(group).num_rows <= skip:
        rows_before += pf.metadata.row_group(group).num_rows
        group += 1
    drop = skip - rows_before  # rows of the first group read that come before `skip`
    groups = list(range(group, pf.num_row_groups))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, row_groups=groups, columns=[text_key]):
        texts = batch.column(0).to_pylist()
        if drop:
            texts, drop = texts[drop:], max(0, drop - len(texts))
        for text in texts:
            yield text if text is not None else ""
