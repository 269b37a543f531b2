"""`unroll data prepare --shard-tokens N`: a corpus of any size tokenized in one streaming pass into a directory
of token shards, which a crash does not lose.

OUT/manifest.json               what was asked and what is done (data/manifest.py), rewritten at each checkpoint
OUT/train-00000.bin/.idx, ...   train shards, in input order
OUT/valid-00000.bin/.idx, ...   valid shards
OUT/valid-part-00003.bin/.idx   (while it runs) the valid documents that came with train shard 3
OUT/.lock                       locked while a prepare writes into OUT (a second one is refused)

Shards. Documents keep their input order, one sequence each (its tokens, then EOS), and are never split
between shards. A train shard is finished at the first document end at or after shard_tokens tokens; finishing
it is a checkpoint. Valid documents are few, so a valid shard would take far longer to fill: at each checkpoint
the valid documents since the last one are finished as a part, and the parts' documents are written again into
a valid shard (the bytes writing them there directly would give) once they hold shard_tokens, and at the end.

Split, while streaming. The number of documents is not known in advance, so each document is placed by its own
index: non-empty document n of the input (counted from 0 over every file; empty documents are skipped and not
counted) goes to valid when blake2b(f"{seed}:{n}"), its first 8 bytes read as an integer, is below
valid_fraction * 2**64. On average valid gets valid_fraction of the documents; which ones depends on the seed
and on nothing else (not the number of workers, not where a run was resumed).

Crash and resume. A shard is written under a temporary name (.train-00003.tmp.bin) and renamed when finished,
then the manifest is rewritten (temporary name, fsync, rename) with the shard and where in the input the next
document is. Running the same command again keeps every shard the manifest lists, deletes the files it does
not list (temporaries, a shard finished after the manifest was last written), and goes on from that position
(data/stream.py skips to it without decoding what comes before): the directory ends byte for byte as an
uninterrupted run leaves it. Other inputs (paths, sizes or mtimes), another tokenizer (by contents) or other
settings are refused, naming what differs, before anything is touched; a complete directory is left as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .encode_pool import encode_in_order
from .errors import DataError
from .manifest import FORMAT, MANIFEST, SPLITS, VERSION, read_manifest, shard_name, sync_directory, write_manifest
from .prepare import ShardWriter, document_batches, open_tokenizer, progress_bar, token_dtype
from .shards import TokenShard
from .stream import CorpusFile, Position, listed_files, read_records
from .tokenizer import Tokenizer

SPLIT_RULE = 'valid when int.from_bytes(blake2b(f"{seed}:{n}", digest_size=8), "little") < valid_fraction * 2**64'
# every name this module writes into OUT; anything else there is someone else's
_OURS = re.compile(r"^\.?(train|valid|valid-part)-\d{5}(\.tmp)?\.(bin|idx)$|^manifest\.json(\.tmp)?$|^\.lock$")
LOCK = ".lock"


def is_valid_document(n: int, valid_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64


def prepare_directory(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int,
    valid_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    text_key: str = "text",
    progress: bool | None = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize `sources` (data/stream.py says what they may be) with `tokenizer` (a path, or a tokenizer already
    open) into the directory `out_dir` of shards of about `shard_tokens` tokens, with `workers` processes; or
    finish a directory a crash left, or leave a complete one as it is. `log` gets a line per finished shard.
    Returns the manifest."""
    if shard_tokens < 1:
        raise DataError(f"shard_tokens {shard_tokens} must be positive")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction {valid_fraction} must be in [0, 1)")
    tokenizer = open_tokenizer(tokenizer)
    files = listed_files(sources)
    out = os.path.abspath(os.fspath(out_dir))
    dtype = token_dtype(tokenizer.vocab_size)
    request = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer.path,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": np.dtype(dtype).name,
        "settings": {
            "text_key": text_key,
            "valid_fraction": valid_fraction,
            "seed": seed,
            "shard_tokens": shard_tokens,
            "split": SPLIT_RULE,
        },
        "sources": [os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
        "inputs": [{"path": f.path, "bytes": f.size, "mtime_ns": f.mtime_ns} for f in files],
    }
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"out_dir {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    with _only_writer(out):
        manifest = _open_directory(out, request)
        if not manifest["complete"]:
            _prepare(manifest, files, tokenizer, _Run(out, manifest, dtype, log), text_key, workers, progress)
    return manifest


def _prepare(
    manifest: dict, files: list[CorpusFile], tokenizer, run: _Run, text_key: str, workers: int, progress: bool | None
) -> None:
    """Tokenize from where the manifest says into `run`'s shards, then finish the directory."""
    resume = manifest["resume"]
    batches = document_batches(read_records(files, text_key, Position(resume["file"], resume["record"])))
    done = sum(r["tokens"] for r in manifest["shards"]) + sum(r["tokens"] for r in manifest["valid_parts"])
    with progress_bar(progress, initial=done) as bar:
        for positions, encoded in encode_in_order(tokenizer, batches, workers):
            for position, ids in zip(positions, encoded.documents()):
                run.add(ids, position)
            bar.update(int(encoded.lengths.sum()))
            bar.set_postfix_str(f"file {positions[-1].file + 1}/{len(files)}", refresh=False)
    run.checkpoint(Position(len(files), 0), final=True)


@contextlib.contextmanager
def _only_writer(out: str) -> Iterator[None]:
    """Hold an exclusive lock on OUT/.lock while preparing into OUT: a second run into the same directory would
    delete the first one's unfinished shards as leftovers. A POSIX record lock, not flock: the tokenizer workers
    (forked) do not inherit it, so it ends with the process that took it, even when a SIGKILL leaves its workers
    a moment longer. Where the file system has no locks (some network file systems), nothing is held."""
    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise DataError(f"another `unroll data prepare` is writing into {out!r}") from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


class _Run:
    """The shards being written and the manifest that records them (updated in place)."""

    def __init__(self, out: str, manifest: dict, dtype: type, log: Callable[[str], None] | None) -> None:
        self.out, self.manifest, self.dtype, self.log = out, manifest, dtype, log
        settings = manifest["settings"]
        self.shard_tokens, self.valid_fraction, self.seed = (
            settings["shard_tokens"],
            settings["valid_fraction"],
            settings["seed"],
        )
        self.doc = manifest["resume"]["doc"]
        self.open: dict[str, ShardWriter | None] = {split: None for split in SPLITS}

    def _index(self, split: str) -> int:
        return sum(r["split"] == split for r in self.manifest["shards"])

    def _writer(self, split: str) -> ShardWriter:
        writer = self.open[split]
        if writer is None:
            train_index = self._index("train")  # a valid part is numbered after the train shard it comes with
            name = shard_name("train", train_index) if split == "train" else shard_name("valid-part", train_index)
            writer = self.open[split] = ShardWriter(os.path.join(self.out, f".{name}.tmp"), self.dtype)
        return writer

    def add(self, ids: np.ndarray, position: Position) -> None:
        split = "valid" if is_valid_document(self.doc, self.valid_fraction, self.seed) else "train"
        writer = self._writer(split)
        writer.add(ids)
        self.doc += 1
        if split == "train" and writer.tokens >= self.shard_tokens:
            self.checkpoint(Position(position.file, position.record + 1))

    def checkpoint(self, resume: Position, final: bool = False) -> None:
        """Finish the open train shard and valid part, join the parts into a valid shard when they hold enough
        (or this is the end), and record it all in the manifest."""
        m = self.manifest
        train, part = self.open["train"], self.open["valid"]
        self.open = {split: None for split in SPLITS}
        if train is not None:
            m["shards"].append(self._finish(train, "train"))
        if part is not None:
            m["valid_parts"].append(self._finish(part, "valid"))
        joined = []
        if m["valid_parts"] and (final or sum(r["tokens"] for r in m["valid_parts"]) >= self.shard_tokens):
            joined, m["valid_parts"] = m["valid_parts"], []
            m["shards"].append(self._join(joined, shard_name("valid", self._index("valid"))))
        if final:
            _check_not_empty(m, self.out)
        m["resume"] = {"doc": self.doc, "file": resume.file, "record": resume.record}
        m["complete"] = final
        m["totals"] = _totals(m["shards"])
        sync_directory(self.out)  # the renamed shards are on disk before the manifest that lists them
        write_manifest(self.out, m)
        for record in joined:
            _remove(self.out, record["name"])

    def _finish(self, writer: ShardWriter, split: str) -> dict:
        """Write the shard's index, flush it to disk and give it its name (its temporary one without . and .tmp)."""
        tmp = writer.prefix
        name = os.path.basename(tmp)[1 : -len(".tmp")]
        record = {"name": name, "split": split, **writer.finish()}
        for ext in (".bin", ".idx"):
            _fsync(tmp + ext)
            os.replace(tmp + ext, os.path.join(self.out, name + ext))
        if self.log and not name.startswith("valid-part"):
            self.log(f"{name}: {record['docs']:,} documents, {record['tokens']:,} tokens")
        return record

    def _join(self, parts: list[dict], name: str) -> dict:
        """The parts' documents written again, in order, as valid shard `name`. (Not the builder's add_index:
        it runs a full gc.collect per part, a quarter second in a process that has imported torch.)"""
        writer = ShardWriter(os.path.join(self.out, f".{name}.tmp"), self.dtype)
        for part in parts:
            shard = TokenShard(os.path.join(self.out, part["name"]))
            for i in range(shard.n_docs):
                writer.add(shard.doc(i))
        return self._finish(writer, "valid")


def _open_directory(out: str, request: dict) -> dict:
    """The manifest to go on with: a new one for a new or empty directory; else the directory's own, once it
    is checked to be this request's and cleared of what it does not list."""
    fresh = request | {
        "complete": False,
        "shards": [],
        "valid_parts": [],
        "resume": {"doc": 0, "file": 0, "record": 0},
        "totals": _totals([]),
    }
    manifest = read_manifest(out)
    if manifest is None:
        found = sorted(set(os.listdir(out)) - {LOCK})
        if found:
            raise DataError(
                f"out_dir {out!r} holds files but no {MANIFEST} ({found[:5]}): "
                "it is not a directory `unroll data prepare --shard-tokens` started; choose a new or empty one"
            )
        write_manifest(out, fresh)
        return fresh
    _check_same_request(out, manifest, request)
    listed = {r["name"] + ext for r in manifest["shards"] + manifest["valid_parts"] for ext in (".bin", ".idx")}
    names = sorted(os.listdir(out))
    foreign = [n for n in names if n not in listed and not _OURS.match(n)]
    if foreign:
        raise DataError(f"out_dir {out!r} holds files `unroll data prepare` did not write ({foreign[:5]}): move them")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for record in manifest["shards"] + manifest["valid_parts"]:
        path = os.path.join(out, record["name"] + ".bin")
        if not os.path.isfile(path) or os.path.getsize(path) != record["tokens"] * itemsize:
            raise DataError(
                f"{path!r} is missing or not the size its {MANIFEST} records ({record['tokens']} tokens): "
                "the directory was changed after it was written; prepare into a new one"
            )
    for name in names:
        if name not in listed and name not in (MANIFEST, LOCK):
            os.remove(os.path.join(out, name))  # an unfinished shard or one finished after the last checkpoint
    return manifest


def _check_same_request(out: str, manifest: dict, request: dict) -> None:
    """Refuse to go on with a directory prepared from other inputs, another tokenizer or other settings."""
    where = f"out_dir {out!r} ({'complete' if manifest['complete'] else 'partly prepared'})"
    fix = "nothing in it was changed: rerun with what it was prepared from to finish it, or choose another --out"
    if manifest["tokenizer_sha256"] != request["tokenizer_sha256"]:
        raise DataError(
            f"{where} was prepared with another tokenizer ({manifest['tokenizer']}) than "
            f"{request['tokenizer']} (their contents differ); {fix}"
        )
    if manifest["eos_id"] != request["eos_id"]:
        raise DataError(f"{where} was prepared with EOS id {manifest['eos_id']}, not {request['eos_id']}; {fix}")
    for key, value in request["settings"].items():
        if manifest["settings"].get(key) != value:
            raise DataError(f"{where} was prepared with {key}={manifest['settings'].get(key)!r}, not {value!r}; {fix}")
    before = {f["path"]: f for f in manifest["inputs"]}
    now = {f["path"]: f for f in request["inputs"]}
    for path in list(before) + list(now):
        if path not in now:
            raise DataError(f"{where} was prepared from {path!r} too, which this run does not read; {fix}")
        if path not in before:
            raise DataError(f"{where} was prepared without {path!r}, which this run reads; {fix}")
        if before[path] != now[path]:
            raise DataError(
                f"{where}: input {path!r} changed since (bytes, mtime {before[path]['bytes']}, "
                f"{before[path]['mtime_ns']} then, {now[path]['bytes']}, {now[path]['mtime_ns']} now); {fix}"
            )
    if list(before) != list(now):
        raise DataError(f"{where} read its inputs in another order; {fix}")


def _check_not_empty(manifest: dict, out: str) -> None:
    totals = _totals(manifest["shards"])
    if totals["docs"] == 0:
        raise DataError(f"empty corpus: {manifest['sources']} has no document with text (nothing written to {out!r})")
    if totals["train"]["docs"] == 0:
        raise DataError(
            f"all {totals['docs']} documents of {manifest['sources']} went to valid: no train shard; "
            "use more documents or a smaller valid_fraction"
        )


def _totals(shards: list[dict]) -> dict:
    totals: dict = {
        split: {
            "shards": sum(r["split"] == split for r in shards),
            "docs": sum(r["docs"] for r in shards if r["split"] == split),
            "tokens": sum(r["tokens"] for r in shards if r["split"] == split),
        }
        for split in SPLITS
    }
    totals["docs"] = sum(totals[s]["docs"] for s in SPLITS)
    totals["tokens"] = sum(totals[s]["tokens"] for s in SPLITS)
    return totals


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(out: str, name: str) -> None:
    for ext in (".bin", ".idx"):
        os.remove(os.path.join(out, name + ext))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise DataError(f"size {text!r}: expected a number of bytes such as 2GB, 500MB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def tokens_per_shard(shard_size: str, tokenizer: str | os.PathLike | Tokenizer) -> int:
    """The shard_tokens that makes a .bin of about `shard_size` bytes (e.g. '2GB') with this tokenizer's dtype."""
    itemsize = np.dtype(token_dtype(open_tokenizer(tokenizer).vocab_size)).itemsize
    tokens = parse_bytes(shard_size) // itemsize
    if tokens < 1:
        raise DataError(f"shard size {shard_size!r} holds no {itemsize}-byte token")
    return tokens
