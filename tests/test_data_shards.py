"""prepare_shards (data/prepare.py), TokenShard, check_vocab: contents, split, dtype, Megatron shards, bad inputs."""

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from unroll.data.errors import DataError
from unroll.data.shards import (
    TokenShard,
    check_vocab,
    indexed_dataset_module,
    prepare_shards,
    split_documents,
)
from unroll.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

VOCAB = 320


def write_corpus(path, n_docs):
    rng = random.Random(0)
    words = "the of and to in is was he for it with as his on be at by this had not are but".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            lines = [" ".join(rng.choices(words, k=rng.randint(5, 15))) for _ in range(5)]
            f.write(json.dumps({"text": f"Document {i}: é 😀\n" + "\n".join(lines)}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=40)
    return corpus, train_tokenizer(corpus, str(root / "sp"), VOCAB)


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def test_shards_hold_each_document_plus_eos(corpus_and_tokenizer, tmp_path):
    corpus, model = corpus_and_tokenizer
    out = prepare_shards(corpus, model, str(tmp_path / "shards"), valid_fraction=0.1, seed=3)
    tok = Tokenizer(model)
    texts = read_texts(corpus)
    expected = [np.array(tok.encode(t) + [tok.eos_id]) for t in texts]
    train_idx, valid_idx = split_documents(len(texts), 0.1, seed=3)
    assert len(valid_idx) == 4 and len(train_idx) == 36

    meta = out["meta"]
    for split, indices in [("train", train_idx), ("valid", valid_idx)]:
        shard = TokenShard(out[split])
        assert shard.dtype == np.uint16  # the vocabulary fits
        assert shard.n_docs == len(indices) == meta[split]["docs"]
        for i, doc in enumerate(indices):
            np.testing.assert_array_equal(shard.doc(i), expected[doc])
        stream = np.concatenate([expected[d] for d in indices])
        assert shard.n_tokens == len(stream) == meta[split]["tokens"]
        np.testing.assert_array_equal(shard.tokens(0, shard.n_tokens), stream)
        np.testing.assert_array_equal(shard.tokens(5, 300), stream[5:305])  # crosses documents
        assert shard.tokens(7, 3).dtype == np.int64

    assert meta["tokenizer"] == os.path.abspath(model)
    assert (meta["vocab_size"], meta["eos_id"], meta["seed"]) == (VOCAB, tok.eos_id, 3)
    with open(tmp_path / "shards" / "meta.json") as f:
        assert json.load(f) == meta
    assert [p for p in os.listdir(tmp_path) if p != "hf"] == ["shards"]  # no temporary dir left


def test_split_is_disjoint_covering_and_seeded():
    for n in [2, 3, 10, 101]:
        for fraction in [0.0, 0.05, 0.5, 0.99]:
            train, valid = split_documents(n, fraction, seed=0)
            assert sorted(np.concatenate([train, valid]).tolist()) == list(range(n))
            assert len(valid) == min(n - 1, max(1, round(fraction * n)))
    assert not np.array_equal(split_documents(100, 0.1, 0)[1], split_documents(100, 0.1, 1)[1])
    np.testing.assert_array_equal(split_documents(100, 0.1, 7)[1], split_documents(100, 0.1, 7)[1])


def test_single_document_is_split_inside(corpus_and_tokenizer, tmp_path):
    _, model = corpus_and_tokenizer
    (tmp_path / "one.txt").write_text("a single document " * 50, encoding="utf-8")
    out = prepare_shards(str(tmp_path / "one.txt"), model, str(tmp_path / "s"), valid_fraction=0.2)
    tok = Tokenizer(model)
    whole = np.array(tok.encode("a single document " * 50) + [tok.eos_id])
    train, valid = TokenShard(out["train"]).doc(0), TokenShard(out["valid"]).doc(0)
    np.testing.assert_array_equal(np.concatenate([train, valid]), whole)
    assert len(valid) == round(0.2 * len(whole))
    assert out["meta"]["split_within_document"]


def test_int32_when_vocab_does_not_fit_uint16(corpus_and_tokenizer, tmp_path, monkeypatch):
    corpus, model = corpus_and_tokenizer
    # the class load_tokenizer opens (a subclass of Tokenizer has its own vocab_size)
    monkeypatch.setattr(type(load_tokenizer(model)), "vocab_size", property(lambda self: 70_000))
    out = prepare_shards(corpus, model, str(tmp_path / "big"), num_proc=1)
    assert TokenShard(out["train"]).dtype == np.int32
    check_vocab(out["train"], 70_000)


def test_check_vocab(corpus_and_tokenizer, tmp_path):
    corpus, model = corpus_and_tokenizer
    out = prepare_shards(corpus, model, str(tmp_path / "s"), num_proc=1)
    check_vocab(out["train"], VOCAB)
    check_vocab(TokenShard(out["valid"]), VOCAB)
    with pytest.raises(DataError, match=r"s/train.*uint16.*vocab_size 70000"):
        check_vocab(out["train"], 70_000)
    with pytest.raises(DataError, match=rf"s/valid.*vocab_size {VOCAB}.*not vocab_size 512"):
        check_vocab(out["valid"], 512)
    # same vocabulary size, other tokenizer (another sample of the corpus): still refused
    check_vocab(out["train"], VOCAB, Tokenizer(model))
    other = Tokenizer(train_tokenizer(corpus, str(tmp_path / "other"), VOCAB, seed=7, input_sentence_size=100))
    assert other.vocab_size == VOCAB and other.sha256 != Tokenizer(model).sha256
    with pytest.raises(DataError, match=r"s/train.*tokenized by another tokenizer.*other\.model"):
        check_vocab(out["train"], VOCAB, other)


def test_rerun_replaces_outputs_but_never_foreign_files(corpus_and_tokenizer, tmp_path):
    corpus, model = corpus_and_tokenizer
    first = prepare_shards(corpus, model, str(tmp_path / "s"), seed=0, num_proc=1)
    second = prepare_shards(corpus, model, str(tmp_path / "s"), seed=1, num_proc=1)
    assert second["meta"]["seed"] == 1 and first["train"] == second["train"]
    with open(tmp_path / "s" / "meta.json") as f:
        assert json.load(f)["seed"] == 1
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files prepare_shards did not write.*notes\.txt"):
        prepare_shards(corpus, model, str(tmp_path / "s"), num_proc=1)
    assert (tmp_path / "s" / "notes.txt").exists()


def write_megatron_style(prefix, docs, append_eod, eod=2):
    """The builder calls of Megatron-LM's tools/preprocess_data.py (Encoder.encode + process_json_file)
    with --split-sentences: dtype optimal_dtype(vocab_size) (int32 for a 100k vocabulary), one
    add_document(doc_ids, sentence_lens) per document, EOD appended to the last sentence with --append-eod."""
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=module.DType.optimal_dtype(100_000))
    expected = []
    for sentences in docs:
        doc_ids, sentence_lens = [], []
        for sentence in sentences:
            if len(sentence) > 0:
                doc_ids.extend(int(t) for t in sentence)
                sentence_lens.append(len(sentence))
        if doc_ids and append_eod:
            doc_ids.append(eod)
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
        expected.append(np.array(doc_ids, dtype=np.int64))
    builder.finalize(prefix + ".idx")
    return expected


@pytest.mark.parametrize("append_eod", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_reads_megatron_multi_sequence_documents(tmp_path, append_eod, contiguous):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(3, 99_000, size=rng.integers(1, 20)) for _ in range(rng.integers(1, 6))] for _ in range(30)]
    docs.insert(7, [])  # a document with no sequences at all (preprocess_data.py writes these too)
    prefix = str(tmp_path / "mega_text_sentence")
    expected = write_megatron_style(prefix, docs, append_eod)
    shard = TokenShard(prefix)
    assert shard.dtype == np.int32
    shard._contiguous = contiguous  # also exercise the sequence-by-sequence path
    assert shard.n_docs == len(docs)
    for i, doc in enumerate(expected):
        np.testing.assert_array_equal(shard.doc(i), doc)
    stream = np.concatenate(expected)
    assert shard.n_tokens == len(stream)
    for start, length in [(0, len(stream)), (3, 1), (10, 57), (len(stream) - 5, 5), (17, 0)]:
        np.testing.assert_array_equal(shard.tokens(start, length), stream[start : start + length])
    with pytest.raises(IndexError):
        shard.tokens(len(stream) - 2, 3)
    reopened = pickle.loads(pickle.dumps(shard))  # as DataLoader workers get it: by prefix
    np.testing.assert_array_equal(reopened.tokens(10, 57), stream[10:67])


def test_bad_shard_files_are_named(tmp_path):
    prefix = str(tmp_path / "x")
    write_megatron_style(prefix, [[[5, 6, 7], [8]], [[9, 10]]], append_eod=True)
    os.rename(prefix + ".bin", prefix + ".bak")
    with pytest.raises(DataError, match=r"missing.*x\.bin"):
        TokenShard(prefix)
    with pytest.raises(DataError, match=r"missing.*nothere\.idx"):
        TokenShard(str(tmp_path / "nothere"))

    with open(prefix + ".bak", "rb") as f:
        data = f.read()
    with open(prefix + ".bin", "wb") as f:
        f.write(data[:-4])  # one int32 token short
    with pytest.raises(DataError, match=r"truncated.*x\.bin"):
        TokenShard(prefix)

    with open(prefix + ".bin", "wb") as f:
        f.write(data)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(DataError, match=r"bad header.*x\.idx"):
        TokenShard(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"")
    with pytest.raises(DataError, match=r"x\.idx"):
        TokenShard(prefix)


def test_prepare_from_a_script_without_main_guard(corpus_and_tokenizer, tmp_path):
    """num_proc=2 from plain top-level script code (datasets forks its workers), offline, with
    HF_HOME and HOME in temporary directories that must stay free of caches."""
    corpus, model = corpus_and_tokenizer
    script = tmp_path / "prep.py"
    script.write_text(
        textwrap.dedent(f"""
        from unroll.data.shards import TokenShard, prepare_shards
        out = prepare_shards({corpus!r}, {model!r}, {str(tmp_path / "out")!r}, num_proc=2)
        print("DOCS", TokenShard(out["train"]).n_docs + TokenShard(out["valid"]).n_docs)
    """)
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DOCS 40" in result.stdout
    for cache in [tmp_path / "hf", tmp_path / "home"]:
        assert not cache.exists() or not any(cache.rglob("*.arrow")), cache
