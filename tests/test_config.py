"""Config: presets, overrides, and bad values stopped before any work with a message naming the key."""

from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from unroll.train.config import ConfigError, load_config, preset_names, to_yaml
from unroll.train.trainer import train


def test_presets_load_and_overrides_apply():
    assert {"tiny-gru", "tiny-transformer"} <= set(preset_names())
    cfg = load_config(
        "tiny-gru",
        [
            "train.steps=7",
            "run.dir=/tmp/x",
            "train.seed=5",
            "checkpoint.every=3",
            "checkpoint.keep=4",
            "data.train=[a,b]",
            "data.weights=[0.25,0.75]",
        ],
    )
    assert (cfg.train.steps, cfg.run.dir, cfg.train.seed, cfg.checkpoint.every, cfg.checkpoint.keep) == (
        7,
        "/tmp/x",
        5,
        3,
        4,
    )
    assert cfg.data.train == [str(Path("a").absolute()), str(Path("b").absolute())]  # an override's: from here
    assert cfg.data.weights == [0.25, 0.75]
    assert cfg.model.pattern == "GGGG"


@pytest.mark.parametrize(
    "override,key,words",
    [
        ("train.stpes=3", "unknown key 'train.stpes'", "did you mean train.steps?"),
        ("trian.steps=3", "unknown key 'trian.steps'", "did you mean train.steps?"),
        ("train.steps=abc", "train.steps", "could not be converted"),
        ("model.n_heads=5", "model.n_heads", "do not divide d_model=192"),
        ("data.seq_len=0", "data.seq_len", "must be positive"),
        ("data.order=random", "data.order", "one of '', 'feistel', 'numpy-permutation', got 'random'"),
        ("data.prefetch=-1", "data.prefetch", "must be >= 0"),
        ("model.pattern=GXA", "model.pattern", "unknown layer kind"),
        ("checkpoint.keep=0", "checkpoint.keep", "at least 1"),
        ("checkpoint.io_threads=0", "checkpoint.io_threads", "between 1 and 64, got 0"),
        ("schedule.name=linear", "schedule.name", "cosine, wsd or constant"),
        ("data.weights=[1.0,2.0]", "data.weights", "2 weights for 1 train datasets"),
        ("optim.beta2=1.5", "optim.beta2", "must be in [0, 1)"),
        ("model.pattern=GXTG", "model.pattern", "unknown layer kind(s) ['X']"),  # T is TNT now
        ("model.mlp_pattern=DEX", "model.mlp_pattern", "unknown MLP kind"),
        ("model.mlp_pattern=DE", "model.mlp_pattern", "has 2 layers, pattern 'MMAM' has 4"),
        ("model.moe.top_k=9", "model.moe.top_k", "more than moe.experts=8"),
        ("model.moe.score=relu", "model.moe.score", "softmax, sigmoid"),
        ("model.m2rnn.qk_heads=3", "model.m2rnn.v_heads", "multiple of m2rnn.qk_heads=3"),
        ("model.m2rnn.solver=fast", "model.m2rnn.solver", "newton, sequential"),
        ("model.window=-1", "model.window", "must be >= 0"),
        ("model.attention_kernel=flash", "model.attention_kernel", "auto, sdpa, flex, got 'flash'"),
        ("model.head_dim=-1", "model.head_dim", "must be >= 0"),
        ("model.rnn_init=0", "model.rnn_init", "must be positive, got 0"),
        ("train.loss_chunk=-1", "train.loss_chunk", "must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-moe", [override])
    assert key in str(err.value) and words in str(err.value)


def test_odd_head_width_is_refused_with_rope_only():
    with pytest.raises(ConfigError, match="model.head_dim: head width 7 must be even for RoPE"):
        load_config("tiny-transformer", ["model.head_dim=7"])
    assert load_config("tiny-transformer", ["model.head_dim=7", "model.rope=false"]).model.attn_head_dim == 7


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 3, "warmup": 10}}))
    with pytest.raises(ConfigError, match=r"train\.warmup.*c\.yaml"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such file or preset.*tiny-gru"):
        load_config("tiny-gur")


def test_data_problems_name_the_key_and_nothing_is_written(tiny_config, tmp_path):
    cases = [
        ({"data": {"tokenizer": str(tmp_path / "missing.model")}}, "data.tokenizer", "missing.model"),
        ({"model": {"vocab_size": 300}}, "model.vocab_size", "320 tokens"),  # more rows than ids would do
        ({"data": {"train": [str(tmp_path / "nope")]}}, "data.train[0]", "nope"),
        ({"data": {"seq_len": 100_000}}, "data.valid", "seq_len 100000"),  # train is longer, valid too short
        ({"data": {"seq_len": 10_000_000}}, "data.train[0]", "seq_len 10000000"),
    ]
    for i, (sections, key, words) in enumerate(cases):
        cfg = load_config(str(tiny_config(f"bad{i}", **sections)))
        with pytest.raises(ConfigError) as err:
            train(cfg)
        assert key in str(err.value) and words in str(err.value), str(err.value)
        assert not (tmp_path / f"bad{i}").exists()  # stopped before creating the run directory


def test_cli_reports_config_error_and_exit_code(offline_env, tmp_path):
    proc = run_cli(
        ["train", "tiny-gru", "model.d_model=100", "model.n_heads=3", f"run.dir={tmp_path}/r"], offline_env, check=False
    )
    assert proc.returncode == 2
    assert "model.n_heads: 3 heads do not divide d_model=100" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_resolved_config_written_to_run_dir(tiny_config):
    cfg = load_config(str(tiny_config("resolved", train={"steps": 2}, checkpoint={"every": 0})))
    train(cfg)
    written = load_config(f"{cfg.run.dir}/config.yaml")
    assert cfg.data.order == "" and written.data.order == "feistel"  # as resolved for the run (train/data_order.py)
    written.data.order = ""
    assert to_yaml(written) == to_yaml(cfg)
    # a resume with a changed config keeps the earlier one beside it
    cfg.train.steps = 3
    train(cfg)
    olds = list(Path(cfg.run.dir).glob("config.*.yaml"))
    assert len(olds) == 1 and load_config(str(olds[0])).train.steps == 2
