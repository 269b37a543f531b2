"""Every check of a run that needs no process group, in one place: the launchers (`unroll launch local`,
`unroll launch slurm`, dry runs too) run it before any process starts or any job is queued, and every
rank runs the same functions again before it builds anything (train/trainer.py), so a layout, batch or
data mistake is one line naming the key in the launcher's terminal, not a traceback from each rank.

What is checked, for a config on `world` ranks:
  layout      pp × dp_replicate × dp_shard × cp × tp is the world size, ep divides dp_shard × cp
              (train/parallel/mesh.py resolve_layout), and the combination is one the trainer runs (check_supported)
  model       heads, widths and the vocabulary divisible by tp, experts by ep, the sequence by cp and tp,
              layers ≥ stages (train/parallel/mesh.py check_model)
  batch       train.batch_size divisible by the data ranks, train.micro_batch_size dividing each one's
              share (train/config.py check_world); under pipelining the default micro-batch (below)
  pipeline    the schedule, the stage split and its micro-batches (train/parallel/pipeline_split.py check_pipeline)
  engine      parallel.engine=deepspeed with data parallelism only, without what it cannot run (check_engine)
  data        the tokenizer and every shard open and match model.vocab_size, their token ids below it
              (train/data_setup.py open_run_data, and the data/ checks it calls)

Pipelining's default micro-batch: with parallel.pp > 1 and train.micro_batch_size=0, each data rank's
share of the batch is split into the fewest micro-batches that are at least the schedule's stages and
that the schedule accepts (1F1B on 2 stages: a share of 8 runs as 2 micro-batches of 4). A share too
small for that is refused with the train.batch_size that would do.
"""

from __future__ import annotations

from dataclasses import dataclass

from unroll.train.config import Config, check_world
from unroll.train.parallel.mesh import Layout, LayoutError, check_model, check_supported, resolve_layout
from unroll.train.parallel.pipeline_split import check_microbatches, check_pipeline, schedule_spec


@dataclass(frozen=True)
class RunShape:
    """How a config runs on its ranks."""

    layout: Layout
    micro: int  # sequences per forward on one data rank
    accum: int  # forwards (micro-batches) per optimizer step on one data rank


def preflight(cfg: Config, world: int, *, data: bool = True) -> RunShape:
    """Everything `unroll train` on `world` ranks would refuse before building a model: LayoutError or
    ConfigError naming the key and value. data=False skips opening the data files (a launcher on a
    machine that does not see them)."""
    shape = check_layout(cfg, world)
    if data:
        check_data(cfg)
    return shape


def check_layout(cfg: Config, world: int) -> RunShape:
    """The layout `parallel.*` asks for on `world` ranks, checked against the model and the batch."""
    return check_shape(cfg, resolve_layout(cfg.parallel, world))


def check_shape(cfg: Config, layout: Layout) -> RunShape:
    """`layout` (resolved) checked against the model, the batch and the pipeline schedule."""
    check_model(layout, cfg.model, seq_len=cfg.data.seq_len)
    check_supported(layout)
    check_engine(cfg, layout)  # parallel.engine=deepspeed: data parallelism only
    micro, accum = micro_batches(cfg, layout)
    check_pipeline(layout, cfg, n_microbatches=accum)
    return RunShape(layout, micro, accum)


def layout_problems(cfg: Config, layout: Layout) -> list[str]:
    """What parallel.engine=deepspeed cannot run, each naming its key; [] for the torch engine."""
    if cfg.parallel.engine != "deepspeed":
        return []
    problems = [
        f"parallel.{dim}={getattr(layout, dim)}"
        for dim in ("tp", "pp", "cp", "ep", "dp_replicate")
        if getattr(layout, dim) > 1
    ]
    if cfg.train.trainable:
        problems.append(f"train.trainable={cfg.train.trainable!r}")
    if cfg.train.compile:
        problems.append("train.compile=true")
    if cfg.train.spike_policy == "rollback" and cfg.train.spike_factor:
        problems.append("train.spike_policy=rollback")
    return problems


def check_engine(cfg: Config, layout: Layout) -> None:
    """LayoutError naming every key parallel.engine=deepspeed cannot run with (no import of deepspeed)."""
    problems = layout_problems(cfg, layout)
    if problems:
        raise LayoutError(
            f"parallel.engine=deepspeed runs data parallelism only (ZeRO over parallel.dp_shard); not with "
            f"{', '.join(problems)}: use parallel.engine=torch for those"
        )


def check_data(cfg: Config) -> None:
    """The data checks the ranks run before any work: the tokenizer, every train and validation shard
    opened and matched against model.vocab_size. The one place a launcher's data check plugs in: a new
    check belongs in open_run_data (or the data/ functions it calls), which the ranks run too."""
    from unroll.train.data_setup import open_run_data  # opening shards imports megatron: only when asked

    open_run_data(cfg)


def micro_batches(cfg: Config, layout: Layout) -> tuple[int, int]:
    """(sequences per forward, forwards per step) on each data rank: train.micro_batch_size, or when it
    is 0 the whole share, which under pipelining is split as the schedule needs (module docstring)."""
    micro, accum = check_world(cfg, layout.dp)
    if layout.pp == 1 or cfg.train.micro_batch_size:
        return micro, accum
    try:
        name, _, per_rank_stages, _ = schedule_spec(cfg.parallel.pp_schedule)
    except ValueError:
        return micro, accum  # check_pipeline names the unknown schedule
    stages = layout.pp * per_rank_stages
    share = micro  # accum is 1 here: the whole share in one forward
    n = _fewest_microbatches(name, layout.pp, stages, share)
    if n is None:
        batch = cfg.train.batch_size
        # a multiple of the stage count always splits (every schedule accepts as many micro-batches as stages)
        fits = next(s for s in range(share + 1, share + stages + 1) if _fewest_microbatches(name, layout.pp, stages, s))
        raise LayoutError(
            f"parallel.pp={layout.pp} with parallel.pp_schedule={name} runs {stages} stages: each "
            f"data rank's share of the batch is split into at least {stages} micro-batches that "
            f"{name} accepts, but train.batch_size={batch} over {layout.dp} data rank(s) is "
            f"{share} sequence(s) each; set train.batch_size={fits * layout.dp} (the next that "
            f"splits)"
        )
    return share // n, n


def _fewest_microbatches(schedule: str, pp: int, stages: int, share: int) -> int | None:
    """The fewest micro-batches, at least one per stage, that divide `share` and `schedule` accepts."""
    for n in range(stages, share + 1):
        if share % n == 0:
            try:
                check_microbatches(schedule, n, pp)
            except ValueError:
                continue
            return n
    return None
