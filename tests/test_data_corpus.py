"""read_documents: formats, sources (file, directory, glob, bundled), errors naming the input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unroll.data.corpus import read_documents
from unroll.data.errors import DataError


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_files_are_one_document_each(tmp_path):
    (tmp_path / "b.txt").write_text("second\n\nfile  with spaces\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\nline two é 😀", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored: not a corpus extension")
    ds = read_documents(str(tmp_path))
    assert ds.column_names == ["text"]
    assert ds["text"] == ["first file\nline two é 😀", "second\n\nfile  with spaces\n"]


def test_jsonl_glob_and_text_key(tmp_path):
    write_jsonl(tmp_path / "p1.jsonl", [{"body": "one", "id": 1}, {"body": "two", "id": 2}])
    write_jsonl(tmp_path / "p0.jsonl", [{"body": "zero", "id": 0}, {"body": None, "id": 9}])
    ds = read_documents(str(tmp_path / "p*.jsonl"), text_key="body")
    assert ds.column_names == ["text"]
    assert ds["text"] == ["zero", "", "one", "two"]  # files sorted; null -> empty document


def test_parquet(tmp_path):
    table = pa.table({"content": ["alpha", "beta"], "score": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "x.parquet")
    ds = read_documents(str(tmp_path / "x.parquet"), text_key="content")
    assert ds["text"] == ["alpha", "beta"]


def test_bundled_shakespeare():
    ds = read_documents("bundled:shakespeare")
    assert len(ds) == 42
    assert ds[0]["text"].startswith("ALL'S WELL THAT ENDS WELL")  # sorted by file name
    assert 4_500_000 < sum(len(t) for t in ds["text"]) < 5_500_000  # ~5 MB of plays


def test_missing_source(tmp_path):
    for source in [tmp_path / "nope.jsonl", tmp_path / "nope-*.txt"]:
        with pytest.raises(DataError, match="nope"):
            read_documents(str(source))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no corpus files"):
        read_documents(str(tmp_path / "d"))


def test_unsupported_and_mixed_extensions(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file type.*data\.csv"):
        read_documents(str(tmp_path / "data.csv"))
    (tmp_path / "a.txt").write_text("hello")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"mixes file types.*\.jsonl.*\.txt"):
        read_documents(str(tmp_path))


def test_missing_text_key_names_key_file_and_columns(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"content": "no text key", "id": 3}])
    with pytest.raises(DataError, match=r"'text'.*bad\.jsonl.*\['content', 'id'\]"):
        read_documents(str(tmp_path))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"'text'.*t\.parquet.*\['body'\]"):
        read_documents(str(tmp_path / "t.parquet"))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty corpus.*empty.jsonl"):
        read_documents(str(tmp_path / "empty.jsonl"))
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match="empty corpus.*blank.jsonl"):
        read_documents(str(tmp_path / "blank.jsonl"))


def test_malformed_json_names_the_source(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl"):
        read_documents(str(tmp_path / "broken.jsonl"))
