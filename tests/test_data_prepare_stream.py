"""`unroll data prepare` at scale: streaming input (formats, compression, positions), a directory of shards
written by worker processes, resume after SIGKILL, refusal of a changed rerun, and training on the directory."""

import fcntl
import gzip
import json
import os
import random
import signal
import time
import types
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from unroll.data.corpus import read_documents
from unroll.data.errors import DataError
from unroll.data.prepare import ShardWriter, prepare_shards
from unroll.data.prepare_dir import is_valid_document, prepare_directory
from unroll.data.shards import TokenShard, indexed_dataset_module
from unroll.data.stream import Position, corpus_files, read_records
from unroll.data.tokenizer import load_tokenizer, train_tokenizer
from unroll.launch.cli import main
from unroll.train.config import ConfigError, load_config

VOCAB = 320
SHARD_TOKENS = 1000
WORDS = "the of and to in is was he for it with as his on be at by this had not are but".split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Doc {i}: é 😀\n" + " ".join(rng.choices(WORDS, k=rng.randint(10, 70))) for i in range(n)]


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs))
    return str(path)


def write_zst(path, data: bytes, frames: int = 2):
    """`data` as `frames` zstandard frames back to back (as pzstd and `cat a.zst b.zst` write)."""
    cut = len(data) // frames
    parts = [data[i * cut : (i + 1) * cut if i < frames - 1 else None] for i in range(frames)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 documents in three files of two sources (a glob of jsonl and a zstd jsonl), one empty document, and a
    tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = texts(80)
    write_jsonl(root / "part0.jsonl", docs[:30])
    write_jsonl(root / "part1.jsonl", docs[30:50] + [""])
    data = "".join(json.dumps({"text": t}) + "\n" for t in docs[50:]).encode()
    write_zst(root / "tail.jsonl.zst", data)
    tokenizer = train_tokenizer(str(root / "part0.jsonl"), str(root / "sp"), VOCAB)
    sources = [str(root / "part*.jsonl"), str(root / "tail.jsonl.zst")]
    return types.SimpleNamespace(root=root, docs=docs, sources=sources, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def prepared(corpus):
    """The directory `unroll data prepare --shard-size 2KB` (1000 uint16 tokens) writes with 2 workers."""
    out = corpus.root / "prepared"
    argv = ["data", "prepare", "--input", *corpus.sources, "--tokenizer", corpus.tokenizer, "--out", str(out)]
    assert main([*argv, "--shard-size", "2KB", "--valid-fraction", "0.25", "--workers", "2"]) == 0
    return out


def tree(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_every_format_streams_to_the_same_documents(tmp_path):
    docs = texts(12)
    docs.insert(1, "")  # an empty document (in the txt directory: d01.txt.gz)
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl/a.jsonl", docs[:5])
    write_jsonl(tmp_path / "jsonl/b.jsonl.gz", docs[5:], opener=gzip.open)
    (tmp_path / "jsonl/notes.md").write_text("not a corpus file: ignored")
    write_zst(tmp_path / "all.jsonl.zst", "".join(json.dumps({"text": t}) + "\n\n" for t in docs).encode(), 3)
    (tmp_path / "array.json").write_text(json.dumps([{"text": t} for t in docs]))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "t.parquet", row_group_size=4)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(docs):
        name, data = f"d{i:02d}.txt", t.encode()
        if i % 3 == 1:
            (tmp_path / "txt" / (name + ".gz")).write_bytes(gzip.compress(data))
        elif i % 3 == 2:
            write_zst(tmp_path / "txt" / (name + ".zst"), data, 1)
        else:
            (tmp_path / "txt" / name).write_bytes(data)

    def streamed(*sources):
        return [text for _, text in read_records(corpus_files(list(sources)))]

    for sources in [
        ["jsonl"],
        [str(tmp_path / "jsonl/a.jsonl"), str(tmp_path / "jsonl/b*")],
        ["all.jsonl.zst"],
        ["array.json"],
        ["t.parquet"],
        ["txt"],
    ]:
        assert streamed(*[os.path.join(tmp_path, s) for s in sources]) == docs, sources
    # the datasets reader of `unroll data tokenizer` reads the uncompressed files to the same documents
    for source in ["jsonl/a.jsonl", "t.parquet"]:
        assert streamed(tmp_path / source) == read_documents(str(tmp_path / source))["text"]


def test_a_reader_started_at_a_position_yields_the_rest(tmp_path):
    docs = texts(11)
    write_jsonl(tmp_path / "a.jsonl", docs[:4])
    pq.write_table(pa.table({"text": docs[4:]}), tmp_path / "b.parquet", row_group_size=3)
    (tmp_path / "c.txt").write_text("last")
    files = corpus_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")])
    everything = list(read_records(files))
    assert [t for _, t in everything] == docs + ["last"]
    assert everything[5][0] == Position(1, 1)
    for i, (position, _) in enumerate(everything):
        assert list(read_records(files, start=position)) == everything[i:]
    assert list(read_records(files, start=Position(3, 0))) == []


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"'text' not found in .*a\.jsonl.*line 2.*\['body'\]"):
        list(read_records(corpus_files(str(tmp_path / "a.jsonl"))))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"b\.jsonl.*line 2 is not JSON"):
        list(read_records(corpus_files(str(tmp_path / "b.jsonl"))))
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"'text' in .*c\.jsonl.*holds int"):
        list(read_records(corpus_files(str(tmp_path / "c.jsonl"))))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:-20])
    with pytest.raises(DataError, match=r"cannot read .*d\.jsonl\.gz"):
        list(read_records(corpus_files(str(tmp_path / "d.jsonl.gz"))))
    (tmp_path / "e.parquet.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"unsupported file type.*e\.parquet\.gz"):
        corpus_files(str(tmp_path / "e.parquet.gz"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed/a.txt").write_text("x")
    (tmp_path / "mixed/b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y"}\n'))
    with pytest.raises(DataError, match=r"mixed.*mixes file formats \['json', 'text'\]"):
        corpus_files(str(tmp_path / "mixed"))


def expected_splits(corpus) -> dict[str, list[np.ndarray]]:
    """Each split's documents in order: the tokenizer's ids + EOS, split by the seeded hash of the index."""
    tok = load_tokenizer(corpus.tokenizer)
    out: dict[str, list[np.ndarray]] = {"train": [], "valid": []}
    for n, ids in enumerate(tok.encode_batch(corpus.docs)):  # the empty document is the input's last
        out["valid" if is_valid_document(n, 0.25, 0) else "train"].append(np.array(ids + [tok.eos_id]))
    return out


def test_workers_do_not_change_the_shards_and_megatron_reads_every_one(corpus, prepared, tmp_path):
    again = tmp_path / "one_worker"
    prepare_directory(corpus.sources, corpus.tokenizer, again, shard_tokens=1000, valid_fraction=0.25, workers=1)
    assert tree(again) == tree(prepared)

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["complete"] and manifest["valid_parts"] == []
    assert [f["path"] for f in manifest["inputs"]] == [
        str(corpus.root / n) for n in ["part0.jsonl", "part1.jsonl", "tail.jsonl.zst"]
    ]
    expected = expected_splits(corpus)
    module = indexed_dataset_module()
    for split in ["train", "valid"]:
        records = [r for r in manifest["shards"] if r["split"] == split]
        assert len(records) >= 2 and all(r["tokens"] >= SHARD_TOKENS for r in records[:-1])
        docs = []
        for r in records:
            ds = module.IndexedDataset(str(prepared / r["name"]))
            assert len(ds) == r["docs"] and ds.sequence_lengths.sum() == r["tokens"]
            docs += [np.array(ds[i]) for i in range(len(ds))]  # a copy: the view dies with ds's mmap
        assert len(docs) == len(expected[split]) == manifest["totals"][split]["docs"]
        for i, (got, want) in enumerate(zip(docs, expected[split])):
            np.testing.assert_array_equal(got, want, err_msg=f"{split} {i}")
    assert manifest["totals"]["docs"] == 80  # the empty document is skipped


def test_default_layout_streams_compressed_input_with_any_workers(corpus, tmp_path):
    plain = prepare_shards(str(corpus.root / "part0.jsonl"), corpus.tokenizer, tmp_path / "plain", workers=1)
    (tmp_path / "z").mkdir()
    write_zst(tmp_path / "z/part0.jsonl.zst", (corpus.root / "part0.jsonl").read_bytes())
    zipped = prepare_shards(str(tmp_path / "z"), corpus.tokenizer, tmp_path / "zipped", workers=2)
    for split in ["train", "valid"]:
        for ext in [".bin", ".idx"]:
            assert open(plain[split] + ext, "rb").read() == open(zipped[split] + ext, "rb").read()


def test_megatron_gpt_dataset_reads_the_directory(prepared, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    train = [r for r in json.loads((prepared / "manifest.json").read_text())["shards"] if r["split"] == "train"]
    for name, data in tree(prepared).items():  # a copy: GPTDataset writes its indices into PREFIX/cache/
        (tmp_path / name).write_bytes(data)
    tokenizer = types.SimpleNamespace(eod=2, pad=-1, vocab_size=VOCAB, unique_identifiers={"class": "sentencepiece"})
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=32,
        blend=([str(tmp_path / r["name"]) for r in train], [r["tokens"] for r in train]),
        split="100,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        mid_level_dataset_surplus=0.005,
    )
    blend = BlendedMegatronDatasetBuilder(GPTDataset, [100, 0, 0], lambda: True, config).build()[0]
    assert [len(ds) for ds in blend.datasets] == [(r["tokens"] - 1) // 32 for r in train]  # one epoch of each
    assert set(blend.dataset_index.tolist()) == set(range(len(train)))
    for ds in blend.datasets:  # a sample is a window of the shard's documents in GPTDataset's (shuffled) order
        stream = np.concatenate([ds.dataset.get(int(d)) for d in ds.document_index]).astype(np.int64).tobytes()
        for i in range(3):
            sample = ds[i]
            window = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]]).astype(np.int64)
            assert len(window) == 33 and stream.find(window.tobytes()) % 8 == 0


def test_a_killed_prepare_resumes_to_the_same_bytes(corpus, prepared, tmp_path):
    """SIGKILL in the middle of train shard 1 (its first part written to a temporary file), then the same
    call again, with another number of workers."""
    out = tmp_path / "resumed"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["shards"][0]["name"] == "train-00000"
    n = train_docs = part_docs = 0
    while train_docs < manifest["shards"][0]["docs"]:  # the documents up to train shard 0's last
        valid = is_valid_document(n, 0.25, 0)
        train_docs, part_docs, n = train_docs + (not valid), part_docs + valid, n + 1
    kill_at = n + 3  # the third document after the first checkpoint
    pid = os.fork()
    if pid == 0:  # the child prepares with 2 workers and kills itself as it adds document `kill_at`
        try:
            added, add = [0], ShardWriter.add

            def add_then_die(self, ids):
                added[0] += 1
                if added[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                add(self, ids)

            ShardWriter.add = add_then_die
            prepare_directory(corpus.sources, corpus.tokenizer, out, shard_tokens=1000, valid_fraction=0.25, workers=2)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = json.loads((out / "manifest.json").read_text())
    assert not left["complete"] and [r["name"] for r in left["shards"]] == ["train-00000"]
    assert [r["name"] for r in left["valid_parts"]] == (["valid-part-00000"] if part_docs else [])
    assert any(name.endswith(".tmp.bin") for name in os.listdir(out))  # what it was writing

    prepare_directory(corpus.sources, corpus.tokenizer, out, shard_tokens=1000, valid_fraction=0.25, workers=1)
    assert tree(out) == tree(prepared)


def test_a_rerun_that_differs_is_refused_and_touches_nothing(corpus, prepared, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in tree(prepared).items():
        (out / name).write_bytes(data)
    before = tree(out)
    same = dict(shard_tokens=1000, valid_fraction=0.25)
    assert prepare_directory(corpus.sources, corpus.tokenizer, out, **same)["complete"]  # complete: left as it is
    for change, match in [
        (dict(shard_tokens=999), "shard_tokens=1000, not 999"),
        (dict(seed=1), "seed=0, not 1"),
        (dict(valid_fraction=0.1), "valid_fraction=0.25, not 0.1"),
        (dict(text_key="body"), "text_key='text', not 'body'"),
    ]:
        with pytest.raises(DataError, match=rf"copy.*{match}"):
            prepare_directory(corpus.sources, corpus.tokenizer, out, **(same | change))
    with pytest.raises(DataError, match=r"prepared from .*tail\.jsonl\.zst' too"):
        prepare_directory(corpus.sources[:1], corpus.tokenizer, out, **same)
    other = train_tokenizer(str(corpus.root / "part1.jsonl"), str(tmp_path / "other"), VOCAB)
    with pytest.raises(DataError, match=r"another tokenizer"):
        prepare_directory(corpus.sources, other, out, **same)
    st = os.stat(corpus.root / "part1.jsonl")
    os.utime(corpus.root / "part1.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    try:
        with pytest.raises(DataError, match=r"input .*part1\.jsonl' changed since"):
            prepare_directory(corpus.sources, corpus.tokenizer, out, **same)
    finally:
        os.utime(corpus.root / "part1.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree(out) == before
    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:  # another prepare: it holds the directory's lock until killed
        try:
            fd = os.open(out / ".lock", os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(1)
    try:
        assert os.read(read, 1) == b"x"
        with pytest.raises(DataError, match=r"another `unroll data prepare` is writing into .*copy"):
            prepare_directory(corpus.sources, corpus.tokenizer, out, **same)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert tree(out) == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files but no manifest\.json.*notes\.txt"):
        prepare_directory(corpus.sources, corpus.tokenizer, tmp_path / "foreign", **same)


def test_a_config_naming_the_directory_trains_on_every_shard(corpus, prepared, tmp_path, monkeypatch):
    from unroll.train import data_setup
    from unroll.train.metrics import read_metrics
    from unroll.train.trainer import train

    cfg = {
        "run": {"dir": str(tmp_path / "run"), "threads": 1},
        "model": {"pattern": "G", "vocab_size": VOCAB, "d_model": 16},
        "data": {"train": [str(prepared)], "valid": str(prepared), "tokenizer": corpus.tokenizer, "seq_len": 16},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1},
        "eval": {"every": 2, "batches": 1, "batch_size": 4},
        "checkpoint": {"every": 0},
        "logging": {"wandb": "disabled", "progress": False},
        "sample": {"prompt": ""},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(str(path))
    built, loader = [], data_setup.TokenLoader
    monkeypatch.setattr(data_setup, "TokenLoader", lambda ds, w, **kw: built.append((ds, w)) or loader(ds, w, **kw))
    data = data_setup.open_run_data(config)
    shards = json.loads((prepared / "manifest.json").read_text())["shards"]
    train_shards = [r for r in shards if r["split"] == "train" and r["tokens"] > 16]
    (train_sets, weights), (valid_sets, _) = built
    assert [ds.shard.prefix for ds in train_sets] == [str(prepared / r["name"]) for r in train_shards]
    tokens = np.array([r["tokens"] for r in train_shards], dtype=float)
    np.testing.assert_allclose(weights, tokens / tokens.sum())  # data.weights unset: the entry's weight is 1
    assert [ds.shard.prefix for ds in valid_sets] == [
        str(prepared / r["name"]) for r in shards if r["split"] == "valid"
    ]
    assert data.valid.n_samples == sum(ds.n_samples for ds in valid_sets)
    batch, (which, index) = data.train_batch(0, 512), data.train.locate(np.arange(512))
    assert set(which.tolist()) == set(range(len(train_sets)))  # every shard is read, each row from its own
    for row, (d, i) in enumerate(zip(which.tolist(), index.tolist())):
        np.testing.assert_array_equal(batch.tokens[row].numpy(), train_sets[d].sample(i))
    train(config)
    rows = read_metrics(tmp_path / "run")
    assert any("val_loss" in r for r in rows) and any(r.get("step") == 2 and "loss" in r for r in rows)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_text(
        json.dumps(json.loads((prepared / "manifest.json").read_text()) | {"complete": False})
    )
    for key, value, match in [
        ("data.train", f"[{partial}]", r"data\.train\[0\].*partial.*not completely prepared"),
        ("data.valid", str(tmp_path), r"data\.valid.*not one `unroll data prepare` wrote"),
    ]:
        with pytest.raises(ConfigError, match=match):
            data_setup.open_run_data(load_config(str(path), [f"{key}={value}"]))
    os.rename(prepared / "train-00001.idx", tmp_path / "moved.idx")
    try:
        with pytest.raises(ConfigError, match=r"data\.train\[0\].*missing.*train-00001\.idx"):
            data_setup.open_run_data(config)
    finally:
        os.rename(tmp_path / "moved.idx", prepared / "train-00001.idx")


def test_token_shard_reads_a_directory_shard(prepared):
    shard = TokenShard(prepared / "train-00000")
    assert shard.n_docs == json.loads((prepared / "manifest.json").read_text())["shards"][0]["docs"]


def test_bench_prepare_paths_count_the_same_tokens(corpus, tmp_path):
    """`unroll bench prepare`'s corpus and its two timed paths, in this process (the bench runs each in a fresh
    one): the tokenizer alone and prepare count the same tokens (no speed is asserted)."""
    from unroll.launch.bench.prepare import child, write_corpus

    text = tmp_path / "corpus.jsonl"
    write_corpus(text, 0.02, doc_chars=2000)
    assert 0.02e6 <= text.stat().st_size and len(text.read_text().splitlines()) > 5
    common = dict(corpus=str(text), tokenizer=corpus.tokenizer, shard_tokens=3000, workers=1, out=str(tmp_path / "o"))
    encode = child(types.SimpleNamespace(child="encode", batch_threads=0, **common))
    one_thread = child(types.SimpleNamespace(child="encode", batch_threads=1, **common))
    prepare = child(types.SimpleNamespace(child="prepare", batch_threads=0, **common))
    assert encode["tokens"] == one_thread["tokens"] == prepare["tokens"] > 3000
    assert prepare["seconds"] > 0 and prepare["rss_main_mb"] > 0


def test_bench_prepare_names_a_megatron_dir_without_its_script(tmp_path):
    from unroll.launch.bench.prepare import _megatron_command

    with pytest.raises(SystemExit, match="no tools/preprocess_data.py"):
        _megatron_command(str(tmp_path), "--help")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "preprocess_data.py").write_text("")
    cmd, env = _megatron_command(str(tmp_path), "--help")
    assert cmd[1:] == [str(tmp_path / "tools" / "preprocess_data.py"), "--help"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)  # its megatron package before megatron-core's
