"""The run directory and the resolved config written into it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from unroll.train.config import Config, to_yaml

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"  # a copy, so the run directory alone is enough to generate


def prepare_run_dir(cfg: Config, is_main: bool) -> Path:
    """Creates RUN_DIR and writes the resolved config. A run resumed with a different config keeps the
    earlier one beside it (config.<time>.yaml): nothing already saved is lost."""
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
    tmp = run_dir / (TOKENIZER_FILE + ".tmp")
    shutil.copyfile(cfg.data.tokenizer, tmp)
    tmp.replace(run_dir / TOKENIZER_FILE)
    return run_dir
