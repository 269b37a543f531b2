"""The manifest.json of a directory of token shards prepared by `unroll data prepare --shard-tokens` (written by
data/prepare_dir.py), and what a training run finds in a prepared directory.

The manifest says what was asked (the inputs with their sizes and mtimes, the tokenizer, the settings) and what
is done: the finished shards in order, each with its split, documents, tokens and largest token id, and while
the preparation runs where in the input it resumes. Its tokenizer fields are named as in the meta.json of the
single-pair layout (`tokenizer`, `tokenizer_sha256`, `vocab_size`, `eos_id`, `dtype`), so the checks that read
one (shards.check_vocab, shards.token_id_range) read the other.

This module imports nothing heavy: training ranks read manifests.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from .errors import DataError

MANIFEST = "manifest.json"
FORMAT = "unroll prepared corpus: megatron indexed datasets (.bin/.idx), one sequence per document ending in EOS"
VERSION = 1
SPLITS = ("train", "valid")


class PreparedShard(NamedTuple):
    prefix: str  # the shard's path without .bin/.idx
    tokens: int


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def read_manifest(directory: str) -> dict | None:
    """The manifest of `directory`, None if it has none; a file of that name that is not one is an error."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path!r}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path!r} is not the manifest of a directory `unroll data prepare` wrote")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path!r} has manifest version {manifest.get('version')}; this unroll reads {VERSION}")
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    """Write the manifest under a temporary name, flushed to disk, then rename it: a crash leaves the old
    manifest or the new one, never part of one."""
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(directory)


def sync_directory(directory: str) -> None:
    """Make the renames in `directory` durable (a power cut after it keeps them)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def records_by_name(directory: str) -> dict | None:
    """The manifest of `directory` with each finished shard's record also under its name (as meta.json keeps
    "train" and "valid"); None without a manifest."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    return manifest | {record["name"]: record for record in manifest["shards"]}


def prepared_shards(directory: str, split: str) -> list[PreparedShard]:
    """The shards of `split` in a directory `unroll data prepare` wrote, in order with their token counts: every
    finished `split` shard of a manifest (which must be complete), or the one `split` shard of the single-pair
    layout (meta.json). Errors name the directory and what is wrong."""
    manifest = read_manifest(directory)
    if manifest is not None:
        if not manifest.get("complete"):
            raise DataError(
                f"{directory!r} is not completely prepared (its {MANIFEST} lists "
                f"{len(manifest['shards'])} finished shards so far): run the same `unroll data prepare` again to finish"
            )
        shards = [
            PreparedShard(os.path.join(directory, r["name"]), int(r["tokens"]))
            for r in manifest["shards"]
            if r["split"] == split
        ]
        if not shards:
            raise DataError(f"{directory!r} holds no {split} shards (per its {MANIFEST})")
        return shards
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if isinstance(meta, dict) and isinstance(meta.get(split), dict):
            return [PreparedShard(os.path.join(directory, split), int(meta[split]["tokens"]))]
    raise DataError(
        f"{directory!r} is a directory but not one `unroll data prepare` wrote (no {MANIFEST} or meta.json "
        f"naming a {split} shard): name a shard prefix (a .bin/.idx pair without the extension) or such a directory"
    )
