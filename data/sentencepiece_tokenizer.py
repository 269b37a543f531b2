"""A lossless sentencepiece tokenizer: training it from a corpus, and using it (data/tokenizer.py: the other kinds).

Lossless means decode(encode(text)) == text for any text: identity normalization, spaces kept as
they are, no dummy prefix space, and byte fallback, so a character the vocabulary lacks becomes its
UTF-8 bytes instead of <unk>. Ids: unk=0, bos=1, eos=2, no pad.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .errors import DataError
from .stream import CorpusFile, listed_files, nonempty_texts
from .tokenizer import HF_CONFIG_FILE, HF_FILE, SENTENCEPIECE_FILE, Tokenizer, file_sha256, remove_files, replace_file

# Byte fallback reserves one piece per byte value, besides <unk>, <s> and </s>.
MIN_VOCAB_SIZE = 256 + 3 + 1


def train_tokenizer(
    source: str,
    out_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    text_key: str = "text",
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
) -> str:
    """Train a sentencepiece model on the lines of `source`'s documents; return `out_prefix.model`.

    At most `input_sentence_size` lines are used, sampled reproducibly with `seed`. Both
    `out_prefix.model` and `.vocab` are written under temporary names and renamed when complete."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces and 3 "
            f"special tokens, so at least {MIN_VOCAB_SIZE}"
        )
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type {model_type!r}: use 'bpe' or 'unigram'")
    files = listed_files(source)
    next(_texts(files, text_key, source))  # an empty corpus is refused before training starts
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp_prefix = f"{out_prefix}.tmp-{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sampled_lines(lambda: _texts(files, text_key, source), input_sentence_size, seed),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=True,
            # _sampled_lines samples: sentencepiece's own sampling ignores
            # spm.set_random_generator_seed (0.2.x), so it is not reproducible.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,  # bytes; longer lines are skipped (with a warning)
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        # .vocab first: a .model that exists always has its .vocab beside it.
        os.replace(tmp_prefix + ".vocab", out_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", out_prefix + ".model")
    except RuntimeError as e:
        raise _training_error(e, vocab_size, source) from e
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return out_prefix + ".model"


def _sampled_lines(texts: Callable[[], Iterator[str]], size: int, seed: int) -> Iterator[str]:
    """The corpus's lines (texts(): its documents, read again on each call), or `size` of them chosen by a
    generator seeded with `seed`: one pass counts the lines, a second yields the chosen ones."""
    n_lines = sum(1 for _ in _lines(texts())) if size > 0 else 0
    if size <= 0 or n_lines <= size:  # size <= 0 means all lines, as in sentencepiece
        yield from _lines(texts())
        return
    keep = np.sort(np.random.default_rng(seed).choice(n_lines, size, replace=False, shuffle=False))
    k = 0
    for i, line in enumerate(_lines(texts())):
        if i == keep[k]:
            yield line
            k += 1
            if k == size:
                return


def _texts(files: list[CorpusFile], text_key: str, source: str) -> Iterator[str]:
    """The documents of `files`, streamed as `unroll data prepare` reads them (compressed files too)."""
    return nonempty_texts(files, text_key, source)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece drops newlines inside a sentence; newlines cost one byte-fallback token each,
    # which is what a dedicated "\n" piece would cost too.
    for text in texts:
        for line in text.splitlines():
            if line:
                yield line


def _training_error(e: RuntimeError, vocab_size: int, source: str) -> Exception:
    msg = str(e)
    if "Vocabulary size too high" in msg:
        return DataError(
            f"vocab_size {vocab_size} is too large for the corpus {source!r}: "
            f"sentencepiece says: {msg.split('] ', 1)[-1]}"
        )
    if "Vocabulary size is smaller than required_chars" in msg:
        return DataError(
            f"vocab_size {vocab_size} is too small for the characters of {source!r}: "
            f"sentencepiece says: {msg.split('] ', 1)[-1]}"
        )
    return DataError(f"training a tokenizer on {source!r} failed: {msg}")


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model. encode adds no BOS/EOS; the caller decides where they go."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._reopen = (self.path,)
        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer model not found: {self.path!r}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(self.path)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"{self.path!r} is not a sentencepiece model: {e} (a tokenizer is a sentencepiece .model file, "
                f"an HF tokenizer.json file, or a directory holding one)"
            ) from None
        if self._sp.eos_id() < 0:  # prepared shards end every document with it
            raise DataError(f"the sentencepiece model {self.path!r} has no EOS piece (eos_id -1)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts in one call (sentencepiece loops in C++, on batch_threads threads; -1 is its every core)."""
        return self._sp.encode(texts, out_type=int, num_threads=self.batch_threads or -1)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # <s> and </s> decode to nothing

    @property
    def sha256(self) -> str:
        """Content hash of the model file."""
        return file_sha256(self.path)

    def save_to(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        replace_file(out, SENTENCEPIECE_FILE, lambda tmp: shutil.copyfile(self.path, tmp))
        remove_files(out, (HF_FILE, HF_CONFIG_FILE))
        return out / SENTENCEPIECE_FILE
