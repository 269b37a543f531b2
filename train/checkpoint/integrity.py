"""Checkpoint integrity: a manifest written last, the checks that refuse a checkpoint before loading it, and
the REFUSED mark a load leaves on a checkpoint whose bytes are not the ones saved.

RUN_DIR/checkpoints/step_N/manifest.json is the completion marker. It is written after every other file of
the checkpoint, and holds
  step                the optimizer step saved
  files               every other file's size in bytes (DCP's .distcp shards, .metadata, RNG states, ...)
  xxh3_128            a checksum of every file but the shards: .metadata, train_state.json, the RNG states and
                      checksums.json, which holds a checksum of every item of every shard, taken as the shards
                      were written and checked as the load reads them (storage.py); so every byte
                      of a checkpoint is covered, and the checks before a load read only the small files
  model               the model's architecture (its config, without the keys that may change on resume:
                      solvers, init scale, MoE loss coefficients, TNT chunk sizes; stage marks removed
                      from the patterns)
A checkpoint is refused, with its directory and the reason, when the manifest is missing (the save did not
finish), a file is missing or of another size, a checksum differs, it was saved from another model, or it
is marked REFUSED. A resume that finds a checkpoint's bytes damaged (here, or an item inside DCP's load)
writes REFUSED into it, a line with the reason, and touches nothing else: later resumes and every save's
rotation then know it is bad without reading its shards again. Delete REFUSED to have it tried again.
Manifests of checkpoints saved before checksums.json (a `sha256` of the small files only) still load, their
shards unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from unroll.train.checkpoint import storage

MANIFEST = "manifest.json"
REFUSED = "REFUSED"
# Keys a resumed run may change without changing what the weights mean.
# Keys added after checkpoints were first written: a manifest without one predates it and is compared without it
# (such a run resumes under the configured value).
LATER_KEYS = {"documents", "rope_document_positions"}
RUNTIME_KEYS = {
    "solver",
    "newton_kernel",
    "newton_damping",
    "attention_kernel",
    "init_std",
    "m2rnn.solver",
    "moe.aux_loss_coef",
    "moe.z_loss_coef",
    "moe.bias_update_rate",
}


def architecture(model_cfg: Any) -> dict | None:
    """The model config as a flat {key: value} dict of what shapes and computes the weights; None when
    there is no config to compare (a module that is not an LM)."""
    if model_cfg is None or not is_dataclass(model_cfg) or isinstance(model_cfg, type):
        return None
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(f"{key}.", v)
            elif key not in RUNTIME_KEYS:
                flat[key] = v

    walk("", asdict(model_cfg))
    # TNT's chunk sizes and reset period change how the memories are trained, not their weights (the
    # two-stage recipe changes them): only how many local memories there are and whether a global one is
    if "tnt.local_chunks" in flat:
        flat["tnt.local_chunks"] = len(flat["tnt.local_chunks"])
        flat["tnt.global_chunk"] = flat["tnt.global_chunk"] > 0
        flat.pop("tnt.local_reset", None)
    layers, mlp_kinds = getattr(model_cfg, "layers", None), getattr(model_cfg, "mlp_kinds", None)
    if layers is not None:  # "GG|AA" and "GGAA" are the same model staged differently
        flat["pattern"] = "".join(layers)
        flat["mlp_pattern"] = "".join(mlp_kinds or ())
    return flat


def _sha256(path: Path) -> str:  # manifests written before checksums.json
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, step: int, model_cfg=None) -> None:
    """Written last, by one rank, once every rank's files are in `path` (after a barrier)."""
    files, sums = {}, {}
    for f in sorted(path.iterdir()):
        if f.name == MANIFEST or not f.is_file():
            continue
        files[f.name] = f.stat().st_size
        if not f.name.endswith(storage.SHARD_SUFFIX):  # shards: per item, in checksums.json
            sums[f.name] = storage.file_digest(f)
    manifest = {"step": step, "files": files, "xxh3_128": sums, "model": architecture(model_cfg)}
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path / MANIFEST)


def read_manifest(path: Path) -> dict:
    with open(path / MANIFEST) as f:
        return json.load(f)


def item_checksums(path: Path) -> dict | None:
    """Every shard item's checksum ({file: {offset: (length, digest)}}), or None for a checkpoint saved before
    them. Call it once `check` has passed (checksums.json then matches the manifest)."""
    return storage.read_checksums(path) if storage.CHECKSUMS in read_manifest(path)["files"] else None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or saved; the message names its path. `damaged`: its bytes are not the
    ones saved (as opposed to a checkpoint of another model), which a resume marks in it."""

    def __init__(self, message: str, *, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


@dataclass(frozen=True)
class Refusal:
    reason: str
    damaged: bool  # its files are not the ones saved (not: another model's, or marked REFUSED already)


def check(path: Path, model_cfg=None) -> Refusal | None:
    """Why the checkpoint at `path` must not be loaded (into a model of `model_cfg`), or None if it may. Reads
    the manifest and the small files, never the shards."""
    if (path / REFUSED).is_file():
        text = (path / REFUSED).read_text(errors="replace").strip()
        return Refusal(f"marked {REFUSED} by an earlier load ({text})", damaged=False)
    if not (path / MANIFEST).is_file():
        return Refusal(f"no {MANIFEST}: the save did not finish (a partial checkpoint)", damaged=True)
    try:
        manifest = read_manifest(path)
        files = dict(manifest["files"])
        sums, summed = (
            (dict(manifest["xxh3_128"]), storage.file_digest)
            if "xxh3_128" in manifest
            else (dict(manifest.get("sha256", {})), _sha256)
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Refusal(f"{MANIFEST} is unreadable ({e})", damaged=True)
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return Refusal(f"file {name} is missing", damaged=True)
        actual = f.stat().st_size
        if actual != size:
            return Refusal(
                f"file {name} is {actual} bytes, the manifest recorded {size} (truncated or overwritten)", damaged=True
            )
        if name in sums and summed(f) != sums[name]:
            return Refusal(f"file {name} does not match its checksum (corrupted)", damaged=True)
    saved, here = manifest.get("model"), architecture(model_cfg)
    if saved is not None and here is not None:
        here = {k: v for k, v in here.items() if k in saved or k not in LATER_KEYS}
    if saved is not None and here is not None and saved != here:
        diff = [
            f"{k}={saved.get(k)!r} in the checkpoint, {here.get(k)!r} here"
            for k in sorted(set(saved) | set(here))
            if saved.get(k) != here.get(k)
        ]
        return Refusal("saved from a different model: " + "; ".join(diff), damaged=False)
    return None


def problem(path: Path, model_cfg=None) -> str | None:
    """`check`'s reason, or None if the checkpoint is good."""
    refusal = check(path, model_cfg)
    return refusal.reason if refusal else None


def agreed_check(path: Path, model_cfg=None) -> Refusal | None:
    """`check`, the same on every rank: each checks the files it sees, and a checkpoint any rank refuses is
    refused by all, so that no rank enters DCP's collective load alone."""
    refusal = check(path, model_cfg)
    if dist.is_available() and dist.is_initialized():
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, refusal)
        refusal = next((r for r in seen if r), None)
    return refusal


def mark_refused(path: Path, reason: str) -> None:
    """Leaves REFUSED (the reason) in a checkpoint whose bytes are damaged; its other files stay as they are."""
    tmp = path / (REFUSED + ".tmp")
    with open(tmp, "w") as f:
        f.write(reason.replace("\n", " ") + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / REFUSED)
