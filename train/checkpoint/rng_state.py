"""Every global RNG state of one rank as JSON: read back without running any code.

A checkpoint holds one file per rank, rng_rank{r}.json:
  python   random.getstate(): {"version", "state": 625 ints, "gauss_next": float or null}
  numpy    numpy's legacy global generator, np.random.get_state():
           {"bit_generator": "MT19937", "key": 624 ints, "pos", "has_gauss", "cached_gaussian"}
  torch    torch.get_rng_state(): its bytes, base64
  cuda     torch.cuda.get_rng_state_all(): one base64 string per device (absent without CUDA)
JSON keeps every value exactly: the states are integers and bytes, and Python writes floats in their
shortest repr, which reads back bit for bit.

Checkpoints written before this format hold rng_rank{r}.pt (torch.save of the same states as Python and
numpy objects). They are read with torch.load(weights_only=True) and an allowlist of exactly the numpy
types a pickled numpy array needs, so a crafted file is refused rather than run.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch


class RNGStateError(ValueError):
    """An RNG state file that cannot be used; the message names the file and the key."""


def file_name(rank: int) -> str:
    return f"rng_rank{rank}.json"


def legacy_file_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture() -> dict:
    """This process's RNG states, in the in-memory form `restore` takes."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def to_json(state: dict) -> dict:
    version, mt, gauss = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
        "numpy": {
            "bit_generator": name,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _b64(state["torch"]),
    }
    if "cuda" in state:
        out["cuda"] = [_b64(t) for t in state["cuda"]]
    return out


def write(path: Path, state: dict) -> None:
    """Written and fsynced: the manifest that follows records its size and checksum."""
    with open(path, "w") as f:
        json.dump(to_json(state), f)
        f.flush()
        os.fsync(f.fileno())


def _need(d: dict, key: str, kind: type, path: Path, where: str = ""):
    value = d.get(key) if isinstance(d, dict) else None
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise RNGStateError(f"{path}: {where}{key} is missing or not a {kind.__name__}")
    return value


def _words(values: list, length: int, path: Path, key: str) -> list[int]:
    if len(values) != length or not all(type(v) is int and 0 <= v < 1 << 32 for v in values):
        raise RNGStateError(f"{path}: {key} must be {length} integers in [0, 2**32)")
    return values


def _bytes(text, path: Path, key: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError) as e:
        raise RNGStateError(f"{path}: {key} is not base64 ({e})") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def from_json(doc: dict, path: Path) -> dict:
    """The in-memory states of a parsed rng_rank{r}.json; RNGStateError naming the file and key if any
    part is missing or malformed."""
    py, npy = _need(doc, "python", dict, path), _need(doc, "numpy", dict, path)
    gauss = py.get("gauss_next")
    if gauss is not None and type(gauss) is not float:
        raise RNGStateError(f"{path}: python.gauss_next must be a float or null")
    mt = _words(_need(py, "state", list, path, "python."), 625, path, "python.state")
    numpy = (
        _need(npy, "bit_generator", str, path, "numpy."),
        np.array(_words(_need(npy, "key", list, path, "numpy."), 624, path, "numpy.key"), dtype=np.uint32),
        _need(npy, "pos", int, path, "numpy."),
        _need(npy, "has_gauss", int, path, "numpy."),
        _need(npy, "cached_gaussian", float, path, "numpy."),
    )
    state = {
        "python": (_need(py, "version", int, path, "python."), tuple(mt), gauss),
        "numpy": numpy,
        "torch": _bytes(_need(doc, "torch", str, path), path, "torch"),
    }
    if "cuda" in doc:
        state["cuda"] = [_bytes(s, path, f"cuda[{i}]") for i, s in enumerate(_need(doc, "cuda", list, path))]
    return _checked(state, path)


def _checked(state: dict, path: Path) -> dict:
    """`state`, once each part has been set on a throwaway generator of its kind (each checks its own state
    whole), so that `restore` cannot fail half-way."""
    for key, check in (
        ("python", lambda s: random.Random().setstate(s)),
        ("numpy", lambda s: np.random.RandomState().set_state(s)),
        ("torch", lambda s: torch.Generator().set_state(s)),
    ):
        if key not in state:
            raise RNGStateError(f"{path}: no {key} RNG state")
        try:
            check(state[key])
        except (TypeError, ValueError, OverflowError, RuntimeError) as e:
            raise RNGStateError(f"{path}: {key} is not a valid {key} RNG state ({e})") from None
    return state


def _numpy_array_globals() -> list:
    """What unpickling a numpy array (the legacy numpy state's key) calls, and nothing else: numpy's array
    reconstructor under its numpy 1 and numpy 2 module names, the array and dtype types."""
    core = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    rebuild = core._reconstruct
    return [
        (rebuild, "numpy.core.multiarray._reconstruct"),
        (rebuild, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _read_legacy(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on a pickle protocol it did not write
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch's UnpicklingError: the global a crafted file asked for, or the opcode
        found = re.search(r"GLOBAL (\S+)|(Unsupported operand \d+)", str(e))
        why = (
            f"it asks for {found.group(1)}, which an RNG state never holds"
            if found and found.group(1)
            else f"not a torch.save file of RNG states ({found.group(2) if found else type(e).__name__})"
        )
        raise RNGStateError(f"{path}: refused, not loaded (loading it could run code): {why}") from None
    try:
        state = {k: tuple(v) if k in ("python", "numpy") else v for k, v in state.items()}
    except (AttributeError, TypeError):
        raise RNGStateError(f"{path}: not a dict of RNG states (python, numpy, torch)") from None
    return _checked(state, path)


def read(directory: Path, rank: int) -> dict:
    """This rank's states from a checkpoint directory (rank 0's when it was saved on fewer ranks: in data
    parallelism every rank draws the same), JSON first, else a legacy .pt file."""
    for r in (rank, 0):
        path = directory / file_name(r)
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise RNGStateError(f"{path}: unreadable ({e})") from None
            return from_json(doc, path)
        if (directory / legacy_file_name(r)).is_file():
            return _read_legacy(directory / legacy_file_name(r))
    raise RNGStateError(f"{directory}: no {file_name(0)}")
