"""Training a byte-level BPE with HF tokenizers (`unroll data tokenizer --kind hf-bpe`): the kind of tokenizer
GPT-2, Llama 3 and Qwen use, written as a transformers tokenizer directory (tokenizer.json and a
tokenizer_config.json naming its EOS).

Lossless: every byte of the text is a symbol (the 256 of the byte-level alphabet are always in the vocabulary)
and nothing is normalised, so decode(encode(text)) == text for any text. Digits are split one per token, as
the sentencepiece tokenizer does. Id 0 is EOS, `<|endoftext|>`; there is no BOS or unknown token. Training
reads every document whole (newlines included), so the merges see the corpus as it will be tokenized.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .stream import listed_files, nonempty_texts

EOS = "<|endoftext|>"
MIN_VOCAB_SIZE = 256 + 1  # the byte alphabet and EOS


def train_hf_bpe(source: str, out_dir: str | os.PathLike, vocab_size: int, *, text_key: str = "text") -> str:
    """Train a byte-level BPE of `vocab_size` tokens on `source`'s documents; write out_dir/tokenizer.json and
    out_dir/tokenizer_config.json (each under a temporary name, then renamed); return the tokenizer.json."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE holds the 256 bytes and {EOS}, so at least "
            f"{MIN_VOCAB_SIZE}"
        )
    texts = nonempty_texts(listed_files(source), text_key, source)
    first = next(texts)  # an empty corpus is refused before training starts
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain([first], texts), trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise DataError(
            f"vocab_size {vocab_size} is too large for the corpus {source!r}: byte-level BPE finds "
            f"{tokenizer.get_vocab_size()} tokens in it (every word one token); use at most that, or more text"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".trained.json.tmp-{os.getpid()}"
    try:
        tokenizer.save(str(tmp))
        return str(HFTokenizer(tmp).save_to(out))
    finally:
        tmp.unlink(missing_ok=True)
