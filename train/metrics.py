"""Where a run's numbers go: RUN_DIR/metrics.jsonl (always), wandb (offline unless configured), one plain
line on stdout per logged step, and a progress bar on a terminal. Only rank 0 writes.

The step lines are the console's record of the run: they read the same in a terminal, a file, a pipe or a
SLURM job's output. The bar is drawn only where stderr is a terminal: elsewhere its `\r` redraws would make a
log one long line."""

from __future__ import annotations

import json
import os
import sys
import uuid
import warnings
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's rows, one per (kind, step): train, val, and each kind of event (a step not applied, a
    rollback); where a resumed or rolled-back run logged a step again (it re-does the steps after its
    checkpoint), the later row wins."""
    path = Path(run_dir) / METRICS_FILE
    rows: dict[tuple[str, int], dict] = {}
    if path.is_file():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill mid-write
                    continue
                kind = row.get("event") or ("val" if "val_loss" in row else "train")
                rows[(kind, row["step"])] = row
    return sorted(rows.values(), key=lambda r: (r["step"], "event" in r, "val_loss" in r))


def format_step(row: dict, total_steps: int) -> str:
    """A training row as one console line, e.g. `step 20/600: loss 5.1234  lr 3.00e-03  grad_norm 0.812
    tokens/s 41,230  tflops/gpu 312  mfu 31.5%`; `tflops/gpu` and `mfu` (a fraction of the peak) only when
    the row carries them (train/mfu.py)."""
    grad = row.get("grad_norm")
    text = (
        f"step {row['step']}/{total_steps}: loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
        f"grad_norm {'-' if grad is None else f'{grad:.3f}'}  tokens/s {row['tokens_per_s']:,.0f}"
    )
    if row.get("tflops_per_gpu") is not None:
        text += f"  tflops/gpu {row['tflops_per_gpu']:.3g}"
    if row.get("mfu") is not None:
        text += f"  mfu {100 * row['mfu']:.1f}%"
    return text


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_mode: str,
        wandb_project: str,
        config: dict,
        progress: bool,
    ):
        self.enabled = enabled
        self.file = open(run_dir / METRICS_FILE, "a") if enabled else None
        self.total_steps = total_steps
        bar = enabled and progress and sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not bar,
            dynamic_ncols=True,
            unit="step",
            file=sys.stderr,
            mininterval=0.5,
        )
        self.wandb = self._init_wandb(run_dir, wandb_mode, wandb_project, config) if enabled else None

    @staticmethod
    def _init_wandb(run_dir: Path, mode: str, project: str, config: dict):
        if mode == "disabled":
            return None
        try:
            import wandb

            id_file = run_dir / "wandb_id"  # a resumed run continues the same wandb run
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            return wandb.init(
                project=project,
                id=run_id,
                resume="allow",
                mode=mode,  # type: ignore[arg-type]  # config.validate admits only wandb's modes
                dir=str(run_dir),
                config=config,
                name=run_dir.name,
                settings=wandb.Settings(init_timeout=60),
            )
        except Exception as e:  # logging must never stop training
            warnings.warn(f"wandb disabled: {e}", stacklevel=2)
            return None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        assert self.file is not None  # enabled: opened in __init__
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            # per-expert lists stay in metrics.jsonl; wandb gets the scalars
            self.wandb.log(
                {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"]
            )
        if "loss" in row and "event" not in row:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            self.write(format_step(row, self.total_steps))
        if "val_loss" in row:
            self.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}  val_ppl {row['val_ppl']:.2f}")

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def rewind(self, step: int) -> None:
        """After a rollback: the bar stands at the step the run went back to."""
        self.bar.n = step
        self.bar.refresh()

    def write(self, text: str) -> None:
        """A message to stdout (the bar, on stderr, is cleared and redrawn around it)."""
        if self.enabled:
            self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
