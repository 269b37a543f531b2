"""parallel.engine=deepspeed (train/deepspeed_engine.py): ZeRO 1, 2 and 3, with and without CPU optimizer offload,
on 2 gloo ranks log the losses of one torch-engine process; a DeepSpeed run killed by SIGKILL resumes bit for bit;
a DeepSpeed checkpoint resumes under the torch engine and the reverse, with the losses of one process; what the
engine cannot run is refused by key. DeepSpeed's JIT-built C++ ops are cached in the venv (TORCH_EXTENSIONS_DIR),
so only the first run on a machine builds them."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEEPSPEED_EXTENSIONS, run_cli, tiny_config_dict, torchrun_train
from paused_run import pause_env, wait_for_pause

from unroll.train.checkpoint import resolve
from unroll.train.config import Config, ConfigError, load_config
from unroll.train.metrics import read_metrics
from unroll.train.parallel.mesh import Layout, LayoutError
from unroll.train.preflight import check_engine

pytest.importorskip("deepspeed")

STEPS = 6
SECTIONS = dict(
    run={"device": "cpu"},  # gloo ranks on the CPU also where GPUs are
    model={"pattern": "GA", "mlp_pattern": "DE", "moe": {"experts": 4, "top_k": 2, "hidden": 16}},
    train={"steps": STEPS, "batch_size": 8, "micro_batch_size": 2},  # 2 micro-batches per rank and step
    checkpoint={"every": 3, "keep": 3},
    eval={"every": 3},
)
REL = 2e-5  # float32: the reduction order differs between one process and ZeRO's flat partitions


@pytest.fixture(scope="module")
def env(offline_env):
    """The ranks' environment: DeepSpeed's JIT ops built once per venv, not per test."""
    return dict(offline_env, TORCH_EXTENSIONS_DIR=DEEPSPEED_EXTENSIONS, DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module")
def root(small_data, tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed"), small_data


def config(root, name: str, **overrides) -> Path:
    base, data = root
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    for key, value in overrides.items():
        sections.setdefault(key, {}).update(value)
    extra = {k: sections.pop(k) for k in ("parallel", "deepspeed") if k in sections}
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(data, base / name, **sections) | extra))
    return path


@pytest.fixture(scope="module")
def one(root, env):
    """The torch engine in one process: the losses every layout is compared with."""
    path = config(root, "one")
    run_cli(["train", path], env)
    return path.parent / "one"


def assert_same_losses(base_dir: Path, run_dir: Path, rel: float = REL, after: int = 0) -> float:
    """Every logged step (after `after`) of run_dir has base_dir's loss, validation loss, grad norm and MoE
    loss within `rel`; returns the largest relative difference of the training losses."""
    base = [r for r in read_metrics(base_dir) if r["step"] > after]
    rows = [r for r in read_metrics(run_dir) if r["step"] > after]
    assert [r["step"] for r in rows] == [r["step"] for r in base] and rows
    worst = 0.0
    for ra, rb in zip(base, rows):
        for key in ("loss", "val_loss", "grad_norm", "moe_aux_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel), (run_dir.name, ra["step"], key)
        if "loss" in ra:
            worst = max(worst, abs(rb["loss"] - ra["loss"]) / abs(ra["loss"]))
    return worst


ZERO = [(stage, offload) for stage in (1, 2, 3) for offload in ("none", "cpu")]


def deepspeed_keys(stage: int, offload: str) -> dict:
    """ZeRO `stage` with the optimizer on `offload`; ZeRO-3 with CPU offload has its parameters there too."""
    keys = {"zero_stage": stage, "offload_optimizer": offload}
    if stage == 3 and offload == "cpu":
        keys["offload_params"] = "cpu"
    return keys


@pytest.fixture(scope="module")
def zero_run(root, env):
    """zero_run(stage, offload) → the run directory of that ZeRO run on 2 ranks (run once per module)."""
    runs: dict = {}

    def run(stage: int, offload: str) -> Path:
        if (stage, offload) not in runs:
            name = f"zero{stage}-{offload}"
            path = config(root, name, parallel={"engine": "deepspeed"}, deepspeed=deepspeed_keys(stage, offload))
            out = torchrun_train(2, path, env)
            assert f"ZeRO-{stage}" in out.stdout + out.stderr
            runs[(stage, offload)] = path.parent / name
        return runs[(stage, offload)]

    return run


@pytest.mark.parametrize("stage,offload", ZERO)
def test_zero_stages_log_the_losses_of_one_process(one, zero_run, stage, offload):
    run_dir = zero_run(stage, offload)
    worst = assert_same_losses(one, run_dir)
    print(f"ZeRO-{stage} offload={offload}: largest relative loss difference {worst:.2e}")
    assert [step for step, _ in resolve.good_checkpoints(run_dir)] == [3, 6]


def test_zero3_with_nvme_offload_logs_the_losses_of_one_process(one, root, env, tmp_path):
    """ZeRO-Infinity: the optimizer's state and the parameters swapped to files in a directory (an NVMe drive's
    stand-in), through DeepSpeed's async I/O op (libaio; the test says so and skips where it cannot build)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async I/O op cannot build here (it needs libaio: Debian's libaio-dev)")
    keys = {"zero_stage": 3, "offload_optimizer": "nvme", "offload_params": "nvme", "nvme_path": str(tmp_path)}
    path = config(root, "zero3-nvme", parallel={"engine": "deepspeed"}, deepspeed=keys)
    out = torchrun_train(2, path, env)
    assert "optimizer on nvme, parameters on nvme" in out.stdout + out.stderr
    worst = assert_same_losses(one, path.parent / "zero3-nvme")
    print(f"ZeRO-3 offload=nvme: largest relative loss difference {worst:.2e}")
    assert [step for step, _ in resolve.good_checkpoints(path.parent / "zero3-nvme")] == [3, 6]
    # DeepSpeed's swap folders for both, per rank (their files are removed when the run ends)
    for what in ("optimizer", "float32params"):
        assert {p.name for p in (tmp_path / "zero_stage_3" / what).iterdir()} == {"rank0", "rank1"}, what


def final_checkpoint(run_dir: Path) -> tuple[dict, dict]:
    """The newest checkpoint of run_dir read into one process: (model state, AdamW state by parameter name)."""
    from unroll.models import LM
    from unroll.train.checkpoint import dcp as checkpoint
    from unroll.train.optim import build_optimizer

    cfg = load_config(str(run_dir / "config.yaml"))
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    checkpoint.load_latest(run_dir, model, optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    moments = {names[id(p)]: state for p, state in optimizer.state.items()}
    return model.state_dict(), moments


def test_a_deepspeed_run_killed_by_sigkill_resumes_bit_for_bit(root, env, zero_run):
    """ZeRO-3 with optimizer and parameters on the CPU: killed (every rank, SIGKILL) after step 4, one step past
    its step-3 checkpoint, and resumed, it logs the uninterrupted run's figures and ends with its weights and
    AdamW state, bit for bit."""
    straight = zero_run(3, "cpu")
    path = config(root, "killed", parallel={"engine": "deepspeed"}, deepspeed=deepspeed_keys(3, "cpu"))
    run_dir = path.parent / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "unroll.launch.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=pause_env(env, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_for_pause(run_dir, 4, ranks=2, running=lambda: proc.poll() is None, timeout=240)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert [step for step, _ in resolve.good_checkpoints(run_dir)] == [3]

    out = torchrun_train(2, path, env)
    assert "resumed at step 3" in out.stdout + out.stderr
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "val_loss", "moe_aux_loss", "tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))
    (model_a, optim_a), (model_b, optim_b) = final_checkpoint(straight), final_checkpoint(run_dir)
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert optim_a.keys() == optim_b.keys() and optim_a
    for name in optim_a:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optim_a[name][key], optim_b[name][key]), (name, key)


def resume_from_step_3(source: Path, dest: Path) -> None:
    """dest: a run directory holding only source's step-3 checkpoint (what a run stopped there leaves)."""
    shutil.copytree(source / "checkpoints" / "step_00000003", dest / "checkpoints" / "step_00000003")


def test_checkpoints_cross_engines(root, env, one, zero_run):
    """A ZeRO-3 (+ CPU offload) checkpoint resumed by the torch engine in one process, and one process's
    checkpoint resumed by ZeRO-2 on 2 ranks, both log one uninterrupted process's losses; the optimizer state
    ZeRO saved is AdamW's of the torch engine (its step count and moments)."""
    ds_to_torch = config(root, "ds-to-torch")
    resume_from_step_3(zero_run(3, "cpu"), ds_to_torch.parent / "ds-to-torch")
    out = run_cli(["train", ds_to_torch], env)
    assert "resumed at step 3" in out.stdout + out.stderr
    worst = assert_same_losses(one, ds_to_torch.parent / "ds-to-torch", after=3)
    print(f"ZeRO-3 checkpoint → torch engine: largest relative loss difference {worst:.2e}")

    torch_to_ds = config(root, "torch-to-ds", parallel={"engine": "deepspeed"}, deepspeed=deepspeed_keys(2, "none"))
    resume_from_step_3(one, torch_to_ds.parent / "torch-to-ds")
    out = torchrun_train(2, torch_to_ds, env)
    assert "resumed at step 3" in out.stdout + out.stderr
    worst = assert_same_losses(one, torch_to_ds.parent / "torch-to-ds", after=3)
    print(f"torch checkpoint → ZeRO-2: largest relative loss difference {worst:.2e}")

    (model_a, optim_a), (model_b, optim_b) = final_checkpoint(one), final_checkpoint(zero_run(3, "cpu"))
    assert optim_a.keys() == optim_b.keys() and optim_a
    for name in optim_a:
        assert float(optim_a[name]["step"]) == float(optim_b[name]["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim_b[name][key], optim_a[name][key], rtol=1e-3, atol=1e-9)
    for name in model_a:
        torch.testing.assert_close(model_b[name], model_a[name], rtol=1e-4, atol=1e-6)


def test_what_the_engine_cannot_run_is_refused_by_key():
    cfg = Config()
    cfg.parallel.engine = "deepspeed"
    check_engine(cfg, Layout(dp_shard=4))  # data parallelism: runs
    for layout, key in (
        (Layout(tp=2, dp_shard=2), "parallel.tp=2"),
        (Layout(pp=2), "parallel.pp=2"),
        (Layout(cp=2), "parallel.cp=2"),
        (Layout(dp_shard=2, ep=2), "parallel.ep=2"),
        (Layout(dp_replicate=2, dp_shard=2), "parallel.dp_replicate=2"),
    ):
        with pytest.raises(LayoutError, match=f"parallel.engine=deepspeed .*{key}"):
            check_engine(cfg, layout)
    cfg.train.compile = True
    with pytest.raises(LayoutError, match="train.compile=true"):
        check_engine(cfg, Layout(dp_shard=2))
    cfg.parallel.engine = "torch"
    check_engine(cfg, Layout(tp=2, dp_shard=2))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.engine=megatron"], "parallel.engine: must be torch or deepspeed"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be 1, 2 or 3"),
        (["deepspeed.offload_optimizer=disk"], "deepspeed.offload_optimizer: must be none, cpu or nvme"),
        (["deepspeed.offload_params=cpu"], "deepspeed.offload_params: offloading parameters needs"),
        (["deepspeed.zero_stage=3", "deepspeed.offload_params=nvme"], "deepspeed.nvme_path: deepspeed.offload_params"),
        (["deepspeed.offload_optimizer=nvme"], "deepspeed.offload_optimizer: nvme needs deepspeed.zero_stage=3"),
        (["deepspeed.cpu_adam=true"], "deepspeed.cpu_adam: steps an offloaded optimizer"),
    ],
)
def test_deepspeed_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-gru", overrides)


def test_the_deepspeed_config_comes_from_unrolls_keys():
    from unroll.train.deepspeed_engine import ds_config

    cfg = load_config(
        "tiny-gru",
        ["parallel.engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "optim.grad_clip=0"],
    )
    ds = ds_config(cfg, micro=2, accum=4, world=2, device=torch.device("cpu"))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        2,
        4,
    )
    assert ds["gradient_clipping"] == 0  # off, explicitly: DeepSpeed's default would clip at 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]


def test_without_deepspeed_installed_the_error_says_how_to_install_it(monkeypatch):
    from unroll.train import deepspeed_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(
        ConfigError, match=r"parallel.engine=deepspeed needs DeepSpeed.*pip install 'unroll\[deepspeed\]'"
    ):
        deepspeed_engine.import_deepspeed()


def test_export_grow_and_generate_read_a_deepspeed_run(root, zero_run):
    """A ZeRO-3 run's checkpoints are unroll's: export writes its final weights, grow stacks them, generate
    samples from them, all in one process."""
    from safetensors.torch import load_file

    from unroll.train.lifecycle.export import export
    from unroll.train.lifecycle.grow import grow
    from unroll.train.lifecycle.inference import generate_text

    run_dir = zero_run(3, "cpu")
    out = root[0] / "exported"
    meta = export(run_dir, out, fmt="unroll")
    assert meta["step"] == STEPS
    weights, (model, _) = load_file(str(out / "model.safetensors")), final_checkpoint(run_dir)
    assert weights.keys() == model.keys()
    for name in model:
        assert torch.equal(weights[name], model[name]), name
    grown = grow(run_dir, 2, root[0] / "grown")
    assert grown["pattern"] == ["GA", "GAGA"] and grown["source_step"] == STEPS
    text = generate_text(run_dir, "To be", max_new_tokens=8)
    assert text.startswith("To be") and len(text) > len("To be")


def test_plan_moves_zero_state_off_the_gpu():
    """`unroll plan` under the DeepSpeed engine: ZeRO-3 keeps 1/dp of the parameters; the offloads move the
    optimizer's 12 bytes per parameter (and the gradients, the parameters) to the CPU, out of the GPU total."""
    from unroll.models import LM
    from unroll.train.planning.plan import estimate, format_estimate

    base = ["parallel.engine=deepspeed", "deepspeed.zero_stage=3"]
    on_gpu = load_config("tiny-gru", base)
    offloaded = load_config("tiny-gru", base + ["deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"])
    a, b = estimate(on_gpu, Layout(dp_shard=8)), estimate(offloaded, Layout(dp_shard=8))
    with torch.device("meta"):
        share = -(-sum(p.numel() for p in LM(on_gpu.model).parameters()) // 8)
    assert a.components.optimizer == share * 12 and b.components.optimizer == 0
    assert b.components.weights < a.components.weights and b.components.gradients == 0
    assert b.offloaded["cpu"] == share * (12 + 4 + 4) and not a.offloaded
    assert b.total < a.total and "offloaded to cpu" in format_estimate(b)


# Loaded by every rank through PYTHONPATH: rank 1's gradients of its 5th training forward (step 3's first
# micro-batch) turn NaN; its loss stays finite.
NAN_ON_RANK_1 = """
import math, os
import torch
import unroll.train.loss as training_loss

class NanGradient(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * math.nan)

calls, loss_fn = [0], training_loss.lm_loss

def lm_loss(*args):
    calls[0] += torch.is_grad_enabled()  # training forwards only, not validation
    loss = loss_fn(*args)
    return NanGradient.apply(loss) if os.environ["RANK"] == "1" and calls[0] == 5 else loss

training_loss.lm_loss = lm_loss
"""


def test_a_nan_gradient_is_judged_inside_zero_and_not_applied(root, env, zero_run):
    """ZeRO-2: the guard judges ZeRO's global gradient norm (NaN from rank 1) before the step; the step is
    skipped on both ranks, and the steps before it are the clean run's."""
    hook = root[0] / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    nan_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p))
    path = config(root, "nan", parallel={"engine": "deepspeed"}, deepspeed=deepspeed_keys(2, "none"))
    proc = torchrun_train(2, path, nan_env)
    assert "step 3 not applied (gradient norm is nan): skipped, 1 so far" in proc.stdout, proc.stdout[-3000:]
    clean = {r["step"]: r for r in read_metrics(zero_run(2, "none")) if "loss" in r}
    after = {r["step"]: r for r in read_metrics(path.parent / "nan") if "loss" in r and "event" not in r}
    assert [after[s]["loss"] for s in (1, 2)] == [clean[s]["loss"] for s in (1, 2)]
    assert 3 not in after and after[STEPS]["skipped_steps"] == 1
    _, moments = final_checkpoint(path.parent / "nan")
    assert {float(state["step"]) for state in moments.values()} == {STEPS - 1}  # AdamW stepped 5 times of 6
