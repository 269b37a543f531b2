"""Training on packed documents end to end: on a corpus of short documents the batches' starts reach the model
(isolated and packed runs differ from the first step), two data-parallel ranks see the boundaries one process
sees, and a resumed run sees the same ones as an uninterrupted run."""

import json
import random
import shutil

import pytest
import yaml
from conftest import losses, run_cli, tiny_config_dict, torchrun_train

from unroll.data.shards import prepare_shards


@pytest.fixture(scope="module")
def short_documents(small_data, tmp_path_factory, offline_env):
    """small_data's tokenizer over 400 documents of 8-30 words: most windows of 32 tokens hold a boundary."""
    root = tmp_path_factory.mktemp("short_docs")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(8, 30)))}) + "\n")
    shards = prepare_shards(str(root / "docs.jsonl"), small_data.tokenizer, str(root / "shards"), num_proc=1)
    return type(small_data)(tokenizer=small_data.tokenizer, train=shards["train"], valid=shards["valid"], vocab=320)


def config(root, name, corpus, documents, **sections):
    cfg = tiny_config_dict(corpus, root / name, **sections)
    cfg["model"]["documents"] = documents
    cfg["train"]["steps"] = 6
    cfg["checkpoint"] = {"every": 3, "keep": 3}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_isolation_reaches_the_model_and_two_ranks_see_the_same_boundaries(short_documents, tmp_path, offline_env):
    run_cli(["train", config(tmp_path, "isolated", short_documents, "isolated")], offline_env)
    run_cli(["train", config(tmp_path, "packed", short_documents, "packed")], offline_env)
    isolated, packed = losses(tmp_path / "isolated"), losses(tmp_path / "packed")
    assert isolated[1] != packed[1]  # the same weights and tokens: only the documents' boundaries differ
    torchrun_train(2, config(tmp_path, "dp2", short_documents, "isolated"), offline_env, "parallel.dp_shard=2")
    two = losses(tmp_path / "dp2")
    assert two.keys() == isolated.keys()
    for step in isolated:
        assert two[step] == pytest.approx(isolated[step], rel=1e-5), step


def test_a_resumed_run_sees_the_boundaries_of_the_uninterrupted_one(short_documents, tmp_path, offline_env):
    path = config(tmp_path, "straight", short_documents, "isolated")
    run_cli(["train", path], offline_env)
    straight = losses(tmp_path / "straight")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000006")  # as if stopped after step 3's checkpoint
    out = run_cli(["train", resumed_dir / "config.yaml", f"run.dir={resumed_dir}"], offline_env).stdout
    assert "resumed at step 3" in out and "step 4/6" in out and "step 3/6" not in out
    assert losses(resumed_dir) == straight
