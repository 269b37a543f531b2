"""The order a run's training samples are shuffled in (data.order), kept for the run's whole life.

samples_consumed counts positions in that order, so a run resumed in another one would go on with other
samples (some seen twice, some never) without a sign. Every checkpoint records its run's order in
train_state.json (`data_order`); a checkpoint written before the key existed was read in numpy's permutation,
the only order there was. Before a run opens its data, data.order is resolved against the newest good
checkpoint of run.dir:

  data.order   the newest checkpoint's order               the run reads
  ""           no checkpoint, or one that read no sample   feistel
  ""           X                                           X
  X            no checkpoint, or one that read no sample   X
  X            X                                           X
  X            Y                                           refused: a ConfigError naming data.order, X and Y
where a checkpoint without the key (it read its samples before the key existed) has numpy-permutation.
The run then records what it reads in its config.yaml (data.order) and in every checkpoint it writes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from unroll.data.loader import NEW_RUN_ORDER, ORDERS
from unroll.train.checkpoint import resolve
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.config import Config, ConfigError

STATE_KEY = "data_order"  # in train_state.json
LEGACY_ORDER = "numpy-permutation"  # of checkpoints without STATE_KEY


def saved_order(train_state: dict) -> str | None:
    """The order a checkpoint's samples were read in; None when it read none (any order continues it)."""
    if STATE_KEY in train_state:
        return str(train_state[STATE_KEY])
    return LEGACY_ORDER if train_state.get("samples_consumed", 0) > 0 else None


def resolved_order(configured: str, train_state: dict | None, checkpoint: str) -> str:
    """The order to read in (module docstring's table); `checkpoint` names the state's file for the messages."""
    saved = saved_order(train_state) if train_state is not None else None
    if saved is None:
        return configured or NEW_RUN_ORDER
    if saved not in ORDERS:
        raise CheckpointError(f"{checkpoint}: {STATE_KEY} {saved!r} is not a data order ({', '.join(ORDERS)})")
    if configured and configured != saved:
        consumed = train_state.get("samples_consumed") if train_state else None
        raise ConfigError(
            f"config key 'data.order': {configured!r}, but the run resumes from {checkpoint}, which read its "
            f"{consumed} samples in the {saved!r} order; another order would go on with other samples (some "
            f"twice, some never): leave data.order empty or set data.order={saved}"
        )
    return saved


def with_run_order(cfg: Config) -> Config:
    """cfg with data.order resolved against run.dir's newest good checkpoint (reads its train_state.json only)."""
    found = resolve.good_checkpoints(cfg.run.dir, cfg.model)
    state, where = None, "no checkpoint"
    if found:
        where = str(Path(found[-1][1]) / resolve.STATE_FILE)
        state = json.loads(Path(where).read_text())
    order = resolved_order(cfg.data.order, state, where)
    return replace(cfg, data=replace(cfg.data, order=order))
