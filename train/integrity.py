"""Checkpoint integrity: a manifest written last, and the checks that refuse a checkpoint before loading it.

RUN_DIR/checkpoints/step_N/manifest.json is the completion marker. It is written after every other file of
the checkpoint, and holds
  step                the optimizer step saved
  files               every other file's size in bytes (DCP's .distcp shards, .metadata, RNG states, ...)
  sha256              checksums of the small files (.metadata, train_state.json, the RNG states); the
                      large .distcp shards are checked by size only, which catches a truncated copy
                      without reading hundreds of GB on every resume
  model               the model's architecture (its config, without the keys that may change on resume:
                      solvers, init scale, MoE loss coefficients, TNT chunk sizes; stage marks removed
                      from the patterns)
A checkpoint is refused, with its directory and the reason, when the manifest is missing (the save did not
finish), a file is missing or of another size, a checksum differs, or it was saved from another model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
# Keys a resumed run may change without changing what the weights mean.
RUNTIME_KEYS = {"solver", "init_std", "m2rnn.solver", "moe.aux_loss_coef", "moe.z_loss_coef",
                "moe.bias_update_rate"}
CHECKSUM_MAX_BYTES = 1 << 20  # files up to this size get a sha256 beside their size


def architecture(model_cfg) -> dict | None:
    """The model config as a flat {key: value} dict of what shapes and computes the weights; None when
    there is no config to compare (a module that is not an LM)."""
    if model_cfg is None or not is_dataclass(model_cfg):
        return None
    flat = {}

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
    if hasattr(model_cfg, "layers"):  # "GG|AA" and "GGAA" are the same model staged differently
        flat["pattern"] = "".join(model_cfg.layers)
        flat["mlp_pattern"] = "".join(model_cfg.mlp_kinds)
    return flat


def _sha256(path: Path) -> str:
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
        if files[f.name] <= CHECKSUM_MAX_BYTES:
            sums[f.name] = _sha256(f)
    manifest = {"step": step, "files": files, "sha256": sums, "model": architecture(model_cfg)}
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def read_manifest(path: Path) -> dict:
    with open(path / MANIFEST) as f:
        return json.load(f)


def problem(path: Path, model_cfg=None) -> str | None:
    """Why the checkpoint at `path` must not be loaded (into a model of `model_cfg`), or None if it is good."""
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST}: the save did not finish (a partial checkpoint)"
    try:
        manifest = read_manifest(path)
        files, sums = dict(manifest["files"]), dict(manifest.get("sha256", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"file {name} is {actual} bytes, the manifest recorded {size} (truncated or overwritten)"
        if name in sums and _sha256(f) != sums[name]:
            return f"file {name} does not match its checksum (corrupted)"
    saved, here = manifest.get("model"), architecture(model_cfg)
    if saved is not None and here is not None and saved != here:
        diff = [f"{k}={saved.get(k)!r} in the checkpoint, {here.get(k)!r} here"
                for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]
        return "saved from a different model: " + "; ".join(diff)
    return None


def agreed_problem(path: Path, model_cfg=None) -> str | None:
    """`problem`, the same on every rank: each checks the files it sees, and a checkpoint any rank refuses is
    refused by all, so that no rank enters DCP's collective load alone."""
    reason = problem(path, model_cfg)
    if dist.is_available() and dist.is_initialized():
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, reason)
        reason = next((r for r in seen if r), None)
    return reason
