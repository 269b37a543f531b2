"""An HF tokenizer: a `tokenizer.json` of the `tokenizers` library (what Llama 3, GPT-NeoX, Qwen and most models
since ship), used through its Rust implementation.

EOS and BOS. A tokenizer.json does not say which of its special tokens ends a document; each is found, in order:
  1. given by the caller (the EOS: a run's data.eos_token),
  2. named in the tokenizer_config.json beside a file named tokenizer.json (`eos_token`, `bos_token`: a
     string, or transformers' {"content": ...} form), as in a transformers tokenizer directory,
  3. the first well-known special token in the vocabulary (WELL_KNOWN_EOS, WELL_KNOWN_BOS).
No EOS is an error that says where to name it; no BOS is fine (bos_id None: nothing in unroll places one).

Text is encoded with add_special_tokens=False (no template adds BOS/EOS: the caller places them). As in
transformers, the text of an added special token inside a document ("<|endoftext|>") encodes as that token;
decode keeps special tokens as their text, so decode(encode(text)) == text for a lossless tokenizer (byte-level
BPE) whatever the text holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import tokenizers

from .errors import DataError
from .tokenizer import (
    HF_CONFIG_FILE,
    HF_FILE,
    SENTENCEPIECE_FILE,
    SpecialTokenError,
    Tokenizer,
    file_sha256,
    remove_files,
    replace_file,
)

WELL_KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<｜end▁of▁sentence｜>")
WELL_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<｜begin▁of▁sentence｜>")


class HFTokenizer(Tokenizer):
    """A tokenizer.json (path: the file). eos_token / bos_token: step 1 of the module docstring's order."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None, bos_token: str | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._reopen = (self.path, eos_token, bos_token)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exceptions for a missing or malformed file
            raise DataError(f"{self.path!r} is not an HF tokenizer.json: {e}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"the HF tokenizer {self.path!r} has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1  # added tokens may leave gaps: ids, not entries, size the model
        beside = os.path.join(os.path.dirname(self.path), HF_CONFIG_FILE)
        self._config_path = beside if os.path.basename(self.path) == HF_FILE and os.path.isfile(beside) else None
        self._config = _read_config(self._config_path) if self._config_path else {}
        eos, self.eos_token = self._special("eos_token", eos_token, WELL_KNOWN_EOS, vocab)
        if eos is None:
            raise SpecialTokenError(self._no_eos_message(), "eos_token", given=False)
        self._eos_id = eos
        self._bos_id, self.bos_token = self._special("bos_token", bos_token, WELL_KNOWN_BOS, vocab)

    def _special(
        self, key: str, given: str | None, well_known: tuple[str, ...], vocab: dict[str, int]
    ) -> tuple[int | None, str | None]:
        """(id, token) of the EOS or BOS by the module docstring's order; (None, None) when none is found."""
        if given:
            if given not in vocab:
                raise SpecialTokenError(f"{key} {given!r} is not a token of the HF tokenizer {self.path!r}", key, True)
            return vocab[given], given
        named = self._config.get(key)
        if isinstance(named, dict):  # transformers' serialised AddedToken
            named = named.get("content")
        if isinstance(named, str) and named:
            if named not in vocab:
                raise SpecialTokenError(
                    f"{self._config_path}: {key} {named!r} is not a token of {self.path!r}", key, given=False
                )
            return vocab[named], named
        for token in well_known:
            if token in vocab:
                return vocab[token], token
        return None, None

    def _no_eos_message(self) -> str:
        if self._config_path:
            where = f"its {HF_CONFIG_FILE} names no eos_token"
        elif os.path.basename(self.path) == HF_FILE:
            where = f"no {HF_CONFIG_FILE} is beside it"
        else:
            where = f"it is not named {HF_FILE}, so no {HF_CONFIG_FILE} is read for it"
        return (
            f"no EOS token for the HF tokenizer {self.path!r}: {where}, and none of {', '.join(WELL_KNOWN_EOS)} "
            f"is in its vocabulary; name the token that ends a document: data.eos_token=TOKEN in a run's config, "
            f"--eos-token TOKEN to `unroll data prepare`, "
            f'or "eos_token": TOKEN in the {HF_CONFIG_FILE} of a transformers tokenizer directory (beside its '
            f"{HF_FILE}), which `unroll data prepare` reads too"
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts in one call: the Rust side spreads a batch over its threads, or with batch_threads 1 encodes
        them one after the other (its thread pool is process-wide, not sized per call)."""
        if self.batch_threads == 1:
            return [self._tok.encode(text, add_special_tokens=False).ids for text in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def sha256(self) -> str:
        """Content hash of the tokenizer.json and of the EOS id: the two decide what a prepared shard holds (a
        document's ids, then EOS), so a copy whose tokenizer_config.json was rewritten hashes the same."""
        return file_sha256(self.path, f"\neos_id={self.eos_id}".encode())

    def transformers_config(self) -> dict[str, Any]:
        """The tokenizer_config.json of a copy: the original's (if any) with the EOS and BOS found, so the copy
        opens alike with no setting, in unroll and in transformers' AutoTokenizer."""
        config = dict(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["eos_token"] = self.eos_token
        if self.bos_token is not None:
            config["bos_token"] = self.bos_token
        return config

    def save_to(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.transformers_config(), indent=2, ensure_ascii=False) + "\n"
        # the config first: a tokenizer.json written is one whose EOS is named beside it
        replace_file(out, HF_CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        replace_file(out, HF_FILE, lambda tmp: shutil.copyfile(self.path, tmp))
        remove_files(out, (SENTENCEPIECE_FILE,))
        return out / HF_FILE


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
