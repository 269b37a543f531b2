"""The run directory and the resolved config written into it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from unroll.train.config import Config, to_yaml

if TYPE_CHECKING:
    from unroll.data.tokenizer import Tokenizer

CONFIG_FILE = "config.yaml"


def prepare_run_dir(cfg: Config, is_main: bool, tokenizer: Tokenizer | None = None) -> Path:
    """Creates RUN_DIR and writes the resolved config and a copy of the tokenizer (data.tokenizer's, unless the
    caller has it open already). A run resumed with a different config keeps the earlier one beside it
    (config.<time>.yaml): nothing already saved is lost."""
    run_dir = Path(cfg.run.dir)
    if not is_main:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if tokenizer is None:
        from unroll.train.data_setup import open_tokenizer  # the data stack: only where a run starts

        tokenizer = open_tokenizer(cfg)
    tokenizer.save_to(run_dir)  # under its kind's names (data/tokenizer.py): the directory alone generates
    return run_dir
