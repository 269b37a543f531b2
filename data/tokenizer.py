"""Tokenizers of every kind behind one interface, and `load_tokenizer`, the one way to open one by its path.

Kinds, by what the path is:
  a sentencepiece model (`*.model`, or any file that is not `.json`)   data/sentencepiece_tokenizer.py
  a `tokenizer.json` of HF tokenizers (Llama 3, GPT-NeoX, Qwen ...),  data/hf_tokenizer.py
    or a transformers tokenizer directory holding one
A directory holding only `tokenizer.model` (a run, grown or export directory of a sentencepiece run) opens
that. Every kind encodes without BOS or EOS (the caller places them) and pickles as what it was opened
from, so worker processes reopen it.

A run, grown or export directory keeps a copy of its tokenizer under fixed names (`save_to`): the
sentencepiece model as tokenizer.model, an HF tokenizer as tokenizer.json beside a tokenizer_config.json
that names its EOS and BOS (so transformers' AutoTokenizer loads the directory, and the copy needs no
setting to open as the original did). `tokenizer_in(directory)` finds it, in old run directories too.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


class SpecialTokenError(DataError):
    """An EOS or BOS token that cannot be found or is not in the vocabulary. `key` is the setting that names
    it (eos_token, bos_token); `given` says whether the caller gave it (a run's data.eos_token) or the
    tokenizer's files did."""

    def __init__(self, message: str, key: str, given: bool) -> None:
        super().__init__(message)
        self.key, self.given = key, given


class _OpensByPath(ABCMeta):
    """`Tokenizer(path)` is `load_tokenizer(path)`: the kind comes from what the path is."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Tokenizer:
            return load_tokenizer(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Tokenizer(metaclass=_OpensByPath):
    """What every kind offers. `path` is the file that defines it; ids run from 0 to vocab_size - 1."""

    # threads encode_batch may use; 0: the library's default (every core). prepare's worker processes set 1, so
    # N workers keep N cores busy instead of starting N × cores threads (data/encode_pool.py)
    batch_threads = 0

    kind: str  # "sentencepiece" | "hf"
    path: str
    _reopen: tuple  # the arguments that open it again (pickling)

    def __reduce__(self) -> tuple:  # pickles as its path (for worker processes)
        return type(self), self._reopen

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """None where the tokenizer has no BOS token (nothing in unroll places one)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts in one call, on batch_threads threads."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. An id past the vocabulary (a model's padding rows, or a special token another tool
        appended, such as Megatron's legacy <EOD>) decodes to nothing."""
        n = self.vocab_size
        return self._decode([int(i) for i in ids if 0 <= int(i) < n])

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def sha256(self) -> str:
        """Content hash of what decides the ids a shard holds: two tokenizers with the same vocabulary size can
        still map text to different ids, and shards remember which one made them."""

    @abstractmethod
    def save_to(self, directory: str | os.PathLike) -> Path:
        """Write this tokenizer into `directory` under the fixed names (module docstring), removing another
        kind's files there; returns the path load_tokenizer opens it by."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
    """The tokenizer stored at `path`, whatever its kind (module docstring). `eos_token` and `bos_token` name
    an HF tokenizer's EOS and BOS, before its tokenizer_config.json and the well-known special tokens
    (data/hf_tokenizer.py); a sentencepiece model has its own."""
    file = os.path.abspath(os.fspath(path))
    if os.path.isdir(file):
        found = tokenizer_in(file)
        if found is None:
            raise DataError(
                f"tokenizer directory {file!r} holds neither {HF_FILE} (an HF tokenizer, as transformers saves "
                f"it) nor {SENTENCEPIECE_FILE} (a sentencepiece model)"
            )
        file = str(found)
    elif not os.path.isfile(file):
        raise DataError(
            f"tokenizer not found: {file!r} (expected a sentencepiece .model file, an HF tokenizer.json file, "
            f"or a directory holding one)"
        )
    if file.endswith(".json"):
        from .hf_tokenizer import HFTokenizer  # each kind's library only where it is used

        return HFTokenizer(file, eos_token or None, bos_token or None)
    for key, given in (("eos_token", eos_token), ("bos_token", bos_token)):
        if given:
            raise SpecialTokenError(
                f"{key} {given!r} names a token of an HF tokenizer (tokenizer.json); the sentencepiece model "
                f"{file!r} has its own",
                key,
                given=True,
            )
    from .sentencepiece_tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(file)


def tokenizer_in(directory: str | os.PathLike) -> Path | None:
    """The tokenizer file a run, grown, export or transformers directory holds: tokenizer.json (transformers
    directories often hold a tokenizer.model beside it, for the slow tokenizer), else tokenizer.model."""
    for name in (HF_FILE, SENTENCEPIECE_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def file_sha256(path: str, extra: bytes = b"") -> str:
    """sha256 of a file's bytes, then `extra`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(extra)
    return digest.hexdigest()


def replace_file(directory: Path, name: str, write: Callable[[Path], object]) -> None:
    """directory/name written whole by `write(tmp_path)` under a temporary name, then renamed."""
    tmp = directory / f"{name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        tmp.replace(directory / name)
    finally:
        tmp.unlink(missing_ok=True)


def remove_files(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)


def __getattr__(name: str) -> Any:
    """The kinds and their training live in their own modules; these names are still found here, where
    callers import them from."""
    if name in ("train_tokenizer", "SentencePieceTokenizer", "MIN_VOCAB_SIZE"):
        from . import sentencepiece_tokenizer

        return getattr(sentencepiece_tokenizer, name)
    if name == "HFTokenizer":
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer
    if name == "train_hf_bpe":
        from .hf_bpe import train_hf_bpe

        return train_hf_bpe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
