"""The run's configuration: an omegaconf structured schema, YAML presets and `key=value` overrides.

Every key a run reads is declared here with its type and default; an unknown key, a value of the wrong
type or an impossible value stops the run before any work with a message naming the key.

Paths. The inputs a config names (data.train, data.valid, data.tokenizer, train.init_from), when relative,
are relative to the YAML file that names them, so a config and its data can move together and be used from
any directory. A bundled preset (named, or given by its path in the package) and `key=value` overrides are
the exceptions: theirs are relative to the current directory (the presets' `runs/data/...` is where
`make run` prepares the data, under the directory it runs in). run.dir, an output, is relative to the
current directory wherever it is written. Every one of these paths is made absolute as the config is
loaded, so the config.yaml a run keeps names its data and itself from anywhere: `unroll train
RUN_DIR/config.yaml`, generate and export work from any directory.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from unroll.models.config import ModelConfig
from unroll.train.config_keys import closest_keys, config_keys, sections
from unroll.train.step_guard import SPIKE_POLICIES

DATA_ORDERS = ("", "feistel", "numpy-permutation")  # data/loader.py ORDERS, and "" (train/data_order.py)


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file) at fault."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, checkpoints/, loss.png
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"  # autocast: auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    collective_timeout_s: int = 600  # a collective waiting longer (a dead or hung rank) raises: the job ends
    step_timeout_s: int = 1800  # an iteration of the loop (step, logging, validation, checkpoint) running longer
    #   dumps every thread's stack into the rank's log and ends the rank (train/watchdog.py); 0 = off


@dataclass
class DataConfig:
    # shard prefixes, or directories `unroll data prepare` wrote (each: its train shards, weighted by tokens)
    train: list[str] = field(default_factory=lambda: ["runs/data/shakespeare/train"])
    weights: list[float] = field(default_factory=list)  # blending weights, one per train entry; [] = equal
    valid: str = "runs/data/shakespeare/valid"  # validation shard prefix or prepared directory; "" = no validation
    tokenizer: str = "runs/data/shakespeare-bpe2048.model"  # sentencepiece .model, HF tokenizer.json, or a
    #   transformers tokenizer directory (holding tokenizer.json)
    eos_token: str = ""  # HF tokenizers: the token that ends a document; "" = tokenizer_config.json's, else a
    #   well-known one (data/hf_tokenizer.py). Its BOS is found likewise (unroll places none)
    vocab_multiple: int = 0  # > 0: model.vocab_size is set to the tokenizer's size rounded up to this multiple
    #   (128: 100277 -> 100352) as the config loads; the config a run writes holds that number, and 0 here
    seq_len: int = 256
    order: str = ""  # a shuffled epoch's order: feistel (computed per sample, no table) or numpy-permutation (a
    #   table per epoch: runs started before feistel); "" = a resumed run's own, a new run's feistel
    #   (train/data_order.py; a run refuses another order than the one it started with)
    prefetch: int = 2  # training batches read ahead in a background thread; 0 = read in the step itself


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    seed: int = 0
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = batch_size / data ranks (no accumulation),
    #   under pipelining that share split into a micro-batch per stage (train/preflight.py)
    log_every: int = 10  # steps between metrics rows (metrics.jsonl, wandb) and console lines (stdout)
    peak_tflops: float = 0.0  # one device's peak dense TFLOP/s, the denominator of the logged mfu; 0 = the
    #   table's for the GPU and run.dtype (train/mfu.py); a device it lacks (a CPU) logs tflops_per_gpu, no mfu
    activation_checkpoint: str = "none"  # none | full (recompute each block) | mlp (recompute MLPs only)
    compile: bool = False  # torch.compile each block (in place, names unchanged)
    init_from: str = ""  # a new run starts from these model weights (not optimizer, data or step): a run
    #   directory (its newest checkpoint) or a checkpoint directory; "" = random init. Ignored on resume.
    trainable: str = ""  # regex over parameter names: only matches are trained, the rest frozen; "" = all
    loss_chunk: int = 1024  # tokens per logits chunk of the loss (recomputed in the backward); 0 = all at once
    # Steps not applied (train/step_guard.py): a non-finite loss or gradient norm always; a loss spike optionally
    max_bad_steps: int = 10  # this many in a row stop the run with an error (its checkpoints kept)
    spike_factor: float = (
        0.0  # a loss above this × the median of the last spike_window applied steps' is a spike; 0 = off
    )
    spike_window: int = 100  # applied steps whose median loss is the reference (no verdict until it is full)
    spike_policy: str = "skip"  # skip: the step is not applied | rollback: reload the newest checkpoint, go on
    #   with the data after the spike's batch


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay


@dataclass
class ParallelConfig:
    """The device mesh (train/parallel/mesh.py). The product of pp, dp_replicate, dp_shard, cp and tp is the world
    size; expert parallelism borrows ranks from dp_shard × cp."""

    dp_replicate: int = 1  # data-parallel replicas (DDP; HSDP's outer dimension when dp_shard > 1)
    dp_shard: int = -1  # data-parallel ranks sharding parameters (FSDP2); -1 = the ranks left over
    cp: int = 1  # context parallel: the sequence split over ranks
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline ranks (stages: pp, or 2·pp for the interleaved and V schedules)
    pp_schedule: str = (
        "1F1B"  # GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV
    )
    ep: int = 1  # expert parallel (divides dp_shard × cp)
    engine: str = "torch"  # torch (the layouts above) | deepspeed (ZeRO over the data ranks: the deepspeed.* keys)


ENGINES = ("torch", "deepspeed")
OFFLOADS = ("none", "cpu", "nvme")


@dataclass
class DeepSpeedConfig:
    """parallel.engine=deepspeed (train/deepspeed_engine.py): DeepSpeed's ZeRO over the data ranks."""

    zero_stage: int = 2  # 1: optimizer state partitioned over the ranks; 2: and gradients; 3: and parameters
    offload_optimizer: str = "none"  # none | cpu | nvme: fp32 master weights and AdamW moments off the GPU
    offload_params: str = "none"  # none | cpu | nvme: the parameters themselves off the GPU (zero_stage=3)
    nvme_path: str = ""  # the NVMe directory for an nvme offload (ZeRO-Infinity)
    cpu_adam: bool = False  # an offloaded optimizer steps with DeepSpeedCPUAdam (C++, built on first use) instead
    #   of torch's AdamW (the same update as parallel.engine=torch)


@dataclass
class EvalConfig:
    every: int = 200  # steps between validations; 0 = only at the end
    batches: int = 8  # validation batches of eval.batch_size sequences (fixed, the first ones)
    batch_size: int = 16


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints; 0 = only at the end and on SIGTERM/SIGINT
    keep: int = 2  # newest complete checkpoints kept (>= 2: a damaged newest one falls back to the one before)
    async_save: bool = False  # write in a background thread while training goes on (train/checkpoint/writer.py)
    # Threads per rank that write shard files (one file each) and read them back, so that storage that needs
    # several requests in flight to reach its speed (NVMe, parallel file systems) gets them.
    io_threads: int = 4


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "unroll"
    progress: bool = True  # progress bar on rank 0, drawn only where stderr is a terminal


@dataclass
class SampleConfig:
    prompt: str = "ROMEO."  # the end-of-run sample; "" = none
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("unroll.configs").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a bundled preset (configs/NAME.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = resources.files("unroll.configs") / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return Path(str(preset))
    near = difflib.get_close_matches(name_or_path, preset_names(), n=1)
    hint = f" (did you mean preset {near[0]!r}?)" if near else f"; presets: {', '.join(preset_names())}"
    if "=" in name_or_path:  # an override where the config goes
        hint = f"; the config comes first, then key=value overrides (presets: {', '.join(preset_names())})"
    raise ConfigError(f"config {name_or_path!r}: no such file or preset{hint}")


def _merge(base: DictConfig, other: DictConfig, source: str, key: str | None = None) -> DictConfig:
    """base ← other (a file's contents, or the override of `key`)."""
    try:
        merged = OmegaConf.merge(base, other)
        assert isinstance(merged, DictConfig)  # a mapping merged into a mapping
        return merged
    except ConfigKeyError as e:
        where = "" if key else f" {source}"  # an override's key is the one typed; a file's, the first unknown
        key = key or getattr(e, "full_key", None) or "?"
        keys = config_keys(Config())
        near = closest_keys(key, [k.name for k in keys] + sections(keys))
        hint = f"did you mean {' or '.join(near)}?" if near else "`unroll train --keys` lists every key"
        raise ConfigError(f"unknown key '{key}'{where} ({hint})") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or key or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}' ({source}): {reason}") from None
    except TypeError:  # OmegaConf refuses e.g. data.train[0]=x: an item into a list
        raise ConfigError(
            f"config key '{key or '?'}' ({source}): give the whole value, e.g. data.train=[a,b]"
        ) from None


# (section, key) of the input paths that a config file's own directory anchors (see the module docstring)
INPUT_PATHS = (("data", "train"), ("data", "valid"), ("data", "tokenizer"), ("train", "init_from"))


def _absolute(value, base: str):
    """A path (or a list of them) made absolute against `base`; "" and interpolations are left as they are,
    and values of another type for the schema to refuse."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value or "${" in value:
        return value
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _is_preset(path: Path) -> bool:
    return path.resolve().parent == Path(str(resources.files("unroll.configs"))).resolve()


def _anchor_inputs(loaded: DictConfig, path: Path) -> DictConfig:
    """The file's relative input paths made absolute against its directory (a preset's: the current one)."""
    base = os.getcwd() if _is_preset(path) else os.path.dirname(os.path.abspath(path))
    raw = OmegaConf.to_container(loaded, resolve=False)
    assert isinstance(raw, dict)  # load_config refused anything but a mapping
    for section, key in INPUT_PATHS:
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = _absolute(raw[section][key], base)
    return OmegaConf.create(raw)  # type: ignore[return-value]  # a dict gives a DictConfig


def _absolute_paths(cfg: Config) -> None:
    """What is still relative (schema defaults, overrides, run.dir) made absolute against the current directory."""
    here = os.getcwd()
    cfg.data.train = _absolute(list(cfg.data.train), here)
    cfg.data.valid, cfg.data.tokenizer = _absolute(cfg.data.valid, here), _absolute(cfg.data.tokenizer, here)
    cfg.train.init_from, cfg.run.dir = _absolute(cfg.train.init_from, here), _absolute(cfg.run.dir, here)


def load_config(name_or_path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults ← YAML file ← `key=value` overrides, paths made absolute (the module docstring says
    against which directory), then validated. Returns the typed object."""
    cfg = OmegaConf.structured(Config)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors and the like
            raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(loaded).__name__}")
        cfg = _merge(cfg, _anchor_inputs(loaded, path), f"in {path}")
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        # from_dotlist reads the value as YAML, where nothing is null: `sample.prompt=` means the empty string
        dotted = OmegaConf.from_dotlist([item if value else f"{key}=''"])
        cfg = _merge(cfg, dotted, f"override {item!r}", key)
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)
    _absolute_paths(typed)
    validate(typed)
    _pad_vocab(typed)
    return typed


def _pad_vocab(cfg: Config) -> None:
    """data.vocab_multiple > 0: model.vocab_size becomes the tokenizer's size rounded up to that multiple, and
    data.vocab_multiple 0, so that the config a run writes holds the number and loads without the tokenizer."""
    multiple = cfg.data.vocab_multiple
    if multiple == 0:
        return
    from unroll.data.errors import DataError
    from unroll.data.tokenizer import SpecialTokenError, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer, eos_token=cfg.data.eos_token)
    except DataError as e:
        key = f"data.{e.key}" if isinstance(e, SpecialTokenError) and e.given else "data.tokenizer"
        raise ConfigError(f"config key '{key}' (read for data.vocab_multiple={multiple}): {e}") from None
    cfg.model.vocab_size = -(-tokenizer.vocab_size // multiple) * multiple
    cfg.data.vocab_multiple = 0


def validate(cfg: Config) -> None:
    problems = [(f"model.{k}", msg) for k, msg in cfg.model.problems()]

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append((key, msg))

    need(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", f"must be auto, cpu or cuda, got {cfg.run.device!r}")
    need(
        cfg.run.dtype in ("auto", "float32", "bfloat16"),
        "run.dtype",
        f"must be auto, float32 or bfloat16, got {cfg.run.dtype!r}",
    )
    need(cfg.run.threads >= 0, "run.threads", f"must be >= 0, got {cfg.run.threads}")
    need(bool(cfg.run.dir), "run.dir", "must name a directory")
    need(
        cfg.run.collective_timeout_s > 0,
        "run.collective_timeout_s",
        f"must be positive, got {cfg.run.collective_timeout_s}",
    )
    need(cfg.data.seq_len > 0, "data.seq_len", f"sequence length must be positive, got {cfg.data.seq_len}")
    need(
        cfg.data.order in DATA_ORDERS,
        "data.order",
        f"must be one of {', '.join(repr(o) for o in DATA_ORDERS)}, got {cfg.data.order!r}",
    )
    need(cfg.data.prefetch >= 0, "data.prefetch", f"must be >= 0 (0 = no prefetch), got {cfg.data.prefetch}")
    need(len(cfg.data.train) > 0, "data.train", "needs at least one shard prefix or prepared directory")
    need(
        not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.train),
        "data.weights",
        f"{len(cfg.data.weights)} weights for {len(cfg.data.train)} train datasets",
    )
    need(all(w > 0 for w in cfg.data.weights), "data.weights", f"weights must be positive, got {cfg.data.weights}")
    need(
        bool(cfg.data.tokenizer),
        "data.tokenizer",
        "must name a sentencepiece .model file, an HF tokenizer.json, or a directory holding one",
    )
    need(
        cfg.data.vocab_multiple >= 0,
        "data.vocab_multiple",
        f"must be >= 0 (0 = model.vocab_size as given), got {cfg.data.vocab_multiple}",
    )
    need(cfg.train.steps >= 0, "train.steps", f"must be >= 0, got {cfg.train.steps}")
    need(cfg.train.batch_size > 0, "train.batch_size", f"must be positive, got {cfg.train.batch_size}")
    need(cfg.train.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {cfg.train.micro_batch_size}")
    need(
        cfg.train.loss_chunk >= 0,
        "train.loss_chunk",
        f"tokens per logits chunk must be >= 0 (0 = all at once), got {cfg.train.loss_chunk}",
    )
    need(cfg.train.log_every > 0, "train.log_every", f"must be positive, got {cfg.train.log_every}")
    need(
        cfg.train.peak_tflops >= 0,
        "train.peak_tflops",
        f"must be >= 0 (0 = from the device), got {cfg.train.peak_tflops}",
    )
    need(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {cfg.train.max_bad_steps}")
    need(
        cfg.train.spike_factor == 0 or cfg.train.spike_factor > 1,
        "train.spike_factor",
        f"must be 0 (off) or above 1 (a multiple of the median loss), got {cfg.train.spike_factor}",
    )
    need(cfg.train.spike_window >= 1, "train.spike_window", f"must be >= 1, got {cfg.train.spike_window}")
    need(
        cfg.train.spike_policy in SPIKE_POLICIES,
        "train.spike_policy",
        f"must be one of {', '.join(SPIKE_POLICIES)}, got {cfg.train.spike_policy!r}",
    )
    need(cfg.run.step_timeout_s >= 0, "run.step_timeout_s", f"must be >= 0 (0 = off), got {cfg.run.step_timeout_s}")
    need(
        cfg.train.activation_checkpoint in ("none", "full", "mlp"),
        "train.activation_checkpoint",
        f"must be none, full or mlp, got {cfg.train.activation_checkpoint!r}",
    )
    try:
        re.compile(cfg.train.trainable)
    except re.error as e:
        need(False, "train.trainable", f"not a regular expression: {e}")
    need(cfg.optim.lr > 0, "optim.lr", f"must be positive, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {cfg.optim.weight_decay}")
    for key in ("beta1", "beta2"):
        value = getattr(cfg.optim, key)
        need(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
    need(cfg.optim.eps > 0, "optim.eps", f"must be positive, got {cfg.optim.eps}")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {cfg.optim.grad_clip}")
    need(
        cfg.schedule.name in ("cosine", "wsd", "constant"),
        "schedule.name",
        f"must be cosine, wsd or constant, got {cfg.schedule.name!r}",
    )
    need(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {cfg.schedule.warmup_steps}")
    need(
        0 <= cfg.schedule.min_lr_ratio <= 1,
        "schedule.min_lr_ratio",
        f"must be in [0, 1], got {cfg.schedule.min_lr_ratio}",
    )
    need(
        0 < cfg.schedule.decay_fraction <= 1,
        "schedule.decay_fraction",
        f"must be in (0, 1], got {cfg.schedule.decay_fraction}",
    )
    need(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    need(cfg.eval.batches > 0, "eval.batches", f"must be positive, got {cfg.eval.batches}")
    need(cfg.eval.batch_size > 0, "eval.batch_size", f"must be positive, got {cfg.eval.batch_size}")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must keep at least 1 checkpoint, got {cfg.checkpoint.keep}")
    need(
        1 <= cfg.checkpoint.io_threads <= 64,
        "checkpoint.io_threads",
        f"must be between 1 and 64, got {cfg.checkpoint.io_threads}",
    )
    need(
        cfg.logging.wandb in ("offline", "online", "disabled"),
        "logging.wandb",
        f"must be offline, online or disabled, got {cfg.logging.wandb!r}",
    )
    need(
        cfg.parallel.engine in ENGINES,
        "parallel.engine",
        f"must be {' or '.join(ENGINES)}, got {cfg.parallel.engine!r}",
    )
    ds = cfg.deepspeed
    need(ds.zero_stage in (1, 2, 3), "deepspeed.zero_stage", f"must be 1, 2 or 3, got {ds.zero_stage}")
    for key in ("offload_optimizer", "offload_params"):
        value = getattr(ds, key)
        need(value in OFFLOADS, f"deepspeed.{key}", f"must be none, cpu or nvme, got {value!r}")
    need(
        ds.offload_params == "none" or ds.zero_stage == 3,
        "deepspeed.offload_params",
        f"offloading parameters needs deepspeed.zero_stage=3, got zero_stage={ds.zero_stage}",
    )
    need(
        ds.offload_optimizer != "nvme" or ds.zero_stage == 3,
        "deepspeed.offload_optimizer",
        f"nvme needs deepspeed.zero_stage=3 (ZeRO-Infinity), got zero_stage={ds.zero_stage}",
    )
    for key in ("offload_optimizer", "offload_params"):
        need(
            getattr(ds, key) != "nvme" or bool(ds.nvme_path),
            "deepspeed.nvme_path",
            f"deepspeed.{key}=nvme needs the NVMe directory",
        )
    need(
        not ds.cpu_adam or ds.offload_optimizer != "none",
        "deepspeed.cpu_adam",
        "steps an offloaded optimizer: set deepspeed.offload_optimizer=cpu or nvme",
    )
    need(cfg.sample.max_new_tokens >= 0, "sample.max_new_tokens", f"must be >= 0, got {cfg.sample.max_new_tokens}")
    need(cfg.sample.temperature >= 0, "sample.temperature", f"must be >= 0, got {cfg.sample.temperature}")
    need(cfg.sample.top_k >= 0, "sample.top_k", f"must be >= 0, got {cfg.sample.top_k}")
    if problems:
        lines = "\n".join(f"  {key}: {msg}" for key, msg in problems)
        raise ConfigError(f"invalid config:\n{lines}")


def check_world(cfg: Config, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for this many data-parallel ranks."""
    batch = cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} is not divisible by the {world} data-parallel ranks")
    per_rank = batch // world
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(train.batch_size={batch} over {world} ranks)"
        )
    return micro, per_rank // micro


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
