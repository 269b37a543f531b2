"""Inputs checked where they enter: a shard's token ids against model.vocab_size before training starts (Megatron
shards are scanned once per process, unroll's record their largest id), a padded model vocabulary trains."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from conftest import run_cli, tiny_config_dict

from unroll.data import shards as S
from unroll.data.errors import DataError
from unroll.data.shards import TokenShard, check_token_ids, check_vocab, indexed_dataset_module
from unroll.data.tokenizer import Tokenizer
from unroll.train.metrics import read_metrics


def write_megatron(prefix, docs, dtype=np.uint16):
    """The builder calls of Megatron-LM's tools/preprocess_data.py: one add_document per document."""
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(list(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def legacy_eod_docs(small_data, eod):
    """The small corpus's train documents as preprocess_data.py --legacy-tokenizer --append-eod writes them:
    each one ends in an EOD id placed after the sentencepiece vocabulary."""
    shard = TokenShard(small_data.train)
    return [np.append(shard.doc(i)[:-1], eod).tolist() for i in range(shard.n_docs)]


def test_train_refuses_a_shard_id_past_the_vocabulary_before_step_1_and_trains_once_padded(
    small_data, tmp_path, offline_env
):
    vocab = small_data.vocab
    (tmp_path / "megatron").mkdir()
    prefix = write_megatron(tmp_path / "megatron" / "text_document", legacy_eod_docs(small_data, eod=vocab))
    (tmp_path / "megatron").chmod(0o555)  # a read-only corpus: nothing may be written beside it
    cfg = tiny_config_dict(small_data, tmp_path / "run", train={"steps": 2}, eval={"every": 0}, checkpoint={"every": 0})
    cfg["data"]["train"] = [prefix]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = run_cli(["train", path], offline_env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    message = proc.stderr.strip()
    for words in (
        f"'{prefix}.bin'",
        f"token id {vocab}",
        f"model.vocab_size is {vocab}",
        f"at least {vocab + 1}",
        "model.vocab_size=384",
        "data.train[0]",
    ):
        assert words in message, (words, message)
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone step 1
    assert sorted(os.listdir(tmp_path / "megatron")) == ["text_document.bin", "text_document.idx"]

    # the fix the message suggests: a padded vocabulary (more rows than the tokenizer has ids) trains
    run_cli(["train", path, "model.vocab_size=384"], offline_env)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]


def test_recorded_largest_id_is_used_without_a_scan(small_data, tmp_path, monkeypatch):
    shards = shutil.copytree(os.path.dirname(small_data.train), tmp_path / "shards")
    meta = json.loads((shards / "meta.json").read_text())
    for split in ("train", "valid"):
        shard = TokenShard(shards / split)
        assert meta[split]["max_token_id"] == int(shard.tokens(0, shard.n_tokens).max())

    def no_scan(*args):
        raise AssertionError("scanned a shard whose meta.json records its largest id")

    monkeypatch.setattr(S, "_scan_ids", no_scan)
    assert check_token_ids([shards / "train", shards / "valid"], small_data.vocab) == max(
        meta["train"]["max_token_id"], meta["valid"]["max_token_id"]
    )
    meta["train"]["max_token_id"] = 999  # the recorded value is the one judged
    (shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError,
        match=r"train\.bin' holds token id 999 \(per the meta.json beside it\).*"
        r"at least 1000 \(e\.g\. model\.vocab_size=1024",
    ):
        check_token_ids([shards / "train"], small_data.vocab)


def test_foreign_shards_are_scanned_once_per_process_in_bounded_windows(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=rng.integers(1, 40)).tolist() for _ in range(50)]
    docs[17][3] = 2050  # one id past a 2048 vocabulary, deep inside
    prefix = write_megatron(tmp_path / "mega", docs)
    scans = []
    real_scan = S._scan_ids
    monkeypatch.setattr(S, "_scan_ids", lambda *a: scans.append(a) or real_scan(*a))
    monkeypatch.setattr(S, "_SCAN_CHUNK", 7)  # many windows, the last one partial
    S._scanned.clear()
    with pytest.raises(
        DataError,
        match=r"mega\.bin' holds token id 2050, but model.vocab_size is 2048.*"
        r"at least 2051 \(e\.g\. model\.vocab_size=2112",
    ):
        check_token_ids([prefix], 2048)
    assert check_token_ids([prefix, TokenShard(prefix)], 2051) == 2050
    assert len(scans) == 1  # the same file is read once per process
    assert sorted(os.listdir(tmp_path)) == ["mega.bin", "mega.idx"]  # no cache written beside the shard

    expected = (min(min(d) for d in docs), 2050)
    assert real_scan(TokenShard(prefix), prefix + ".bin") == expected
    shard = TokenShard(prefix)
    shard._contiguous = False  # the sequence-by-sequence path agrees with the windowed one
    assert real_scan(shard, prefix + ".bin") == expected

    negative = write_megatron(tmp_path / "neg", [[5, -3, 7]], dtype=np.int32)
    with pytest.raises(DataError, match=r"neg\.bin' holds token id -3: token ids cannot be negative"):
        check_token_ids([negative], 2048)


def test_a_padded_model_vocabulary_passes_the_tokenizer_checks_and_decodes(small_data):
    tok = Tokenizer(small_data.tokenizer)
    check_vocab(small_data.train, 384, tok)  # the shard's meta.json names the tokenizer's 320, not the model's
    with pytest.raises(DataError, match="vocab_size 320.*not vocab_size 384"):
        check_vocab(small_data.train, 384)  # without the tokenizer, the model's size is all there is to compare
    ids = tok.encode("To be, or not to be")
    # ids past the tokenizer (padding rows, Megatron's appended <EOD>) decode to nothing, as </s> does
    assert tok.decode([*ids[:3], small_data.vocab, 383, *ids[3:], tok.eos_id]) == "To be, or not to be"
