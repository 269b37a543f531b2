"""train_tokenizer / Tokenizer: lossless round trip, special ids, determinism, and bad inputs."""

import json
import os
import random

import pytest

from unroll.data.errors import DataError
from unroll.data.tokenizer import Tokenizer, train_tokenizer

WORDS = (
    "the of and to in is was he for it with as his on be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these"
).split()

AWKWARD = [
    "",
    " ",
    "  leading spaces and   runs of them   ",
    "\n\nnewlines\n\n\nand\r\nCRLF\r and tabs\t\tend\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "unicode: héllo wörld ñ ß Ωμέγα Привет 日本語 中文 한국어 עברית العربية",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷 and zero\u200bwidth, bom \ufeff, e\u0301 combining",
    "control \x00 \x01 \x7f and surrogate-free astral 𝔘𝔫𝔯𝔬𝔩𝔩",
]


def write_corpus(path, n_docs=60, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 15))) for _ in range(5)]
            f.write(json.dumps({"text": f"Document {i}.\n" + "\n".join(lines)}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


def test_round_trip_is_lossless(corpus, tmp_path):
    path = train_tokenizer(corpus, str(tmp_path / "tok" / "sp"), 400)
    assert path == str(tmp_path / "tok" / "sp.model")
    assert sorted(os.listdir(tmp_path / "tok")) == ["sp.model", "sp.vocab"]  # no temporaries left
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 1, 2)
    assert tok.path == path
    for text in AWKWARD:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
    # learned merges are used: a common word is fewer tokens than bytes
    assert len(tok.encode("the other")) < len("the other")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_seed_decides_the_model(corpus, tmp_path, model_type):
    # 150 of the corpus's ~360 lines are sampled, so the seed matters
    def train(name, seed):
        path = train_tokenizer(
            corpus,
            str(tmp_path / name),
            400,
            model_type=model_type,
            input_sentence_size=150,
            seed=seed,
        )
        tok = Tokenizer(path)
        return [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]

    assert train("a", 0) == train("b", 0)
    assert train("c", 1) != train("a", 0)


def test_vocab_too_large_for_corpus_names_size_and_source(corpus, tmp_path):
    with pytest.raises(DataError, match=r"vocab_size 5000 is too large for the corpus .*corpus"):
        train_tokenizer(corpus, str(tmp_path / "big"), 5000)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("big")]  # nothing half-written


def test_vocab_too_small(corpus, tmp_path):
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        train_tokenizer(corpus, str(tmp_path / "small"), 100)


def test_bad_model_files(tmp_path):
    with pytest.raises(DataError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="junk.model.*not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


@pytest.mark.parametrize("kind", ["sentencepiece", "hf-bpe"])
def test_trains_on_compressed_corpora_as_on_plain_ones_and_refuses_an_empty_one(corpus, tmp_path, kind):
    # tokenizer training streams its input as `data prepare` does: a .jsonl.gz and a .jsonl.zst train the same
    # tokenizer as the .jsonl they hold
    import gzip

    import zstandard

    from unroll.data.hf_bpe import train_hf_bpe

    data = open(corpus, "rb").read()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (tmp_path / "empty.jsonl").write_text("\n" + json.dumps({"text": ""}) + "\n")

    def trained(source, name):
        if kind == "hf-bpe":
            return open(train_hf_bpe(source, tmp_path / name, 300), "rb").read()
        import sentencepiece as spm  # its .model records the output name: compare the pieces and scores

        sp = spm.SentencePieceProcessor(model_file=train_tokenizer(source, str(tmp_path / name), 300))
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

    plain = trained(corpus, "plain")
    assert trained(str(tmp_path / "c.jsonl.gz"), "gz") == plain
    assert trained(str(tmp_path / "c.jsonl.zst"), "zst") == plain
    with pytest.raises(DataError, match="empty corpus: .*empty.jsonl' holds no text"):
        trained(str(tmp_path / "empty.jsonl"), "empty")
