"""`unroll presets` (and `unroll info` without a config): every bundled preset in configs/ with its size,
shape and the hardware it is meant for. The hardware is the preset file's own `# hardware: ...` header
line: a comment, not a config key, because no run reads it and a key would travel on into every run's
config.yaml, growth and export, where it would no longer be true."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

HARDWARE_LINE = re.compile(r"^#\s*hardware:\s*(.+?)\s*$", re.MULTILINE)


def hardware(path: Path) -> str:
    """The preset's `# hardware:` header line ("" if it has none)."""
    found = HARDWARE_LINE.search(path.read_text(encoding="utf-8"))
    return found.group(1) if found else ""


def preset_rows() -> list[dict]:
    from unroll.models.summary import summarize
    from unroll.train.config import load_config, preset_names

    rows = []
    for name in preset_names():
        path = Path(str(resources.files("unroll.configs") / f"{name}.yaml"))  # not a same-named local file
        cfg = load_config(str(path))
        summary = summarize(cfg.model)
        rows.append(
            {
                "preset": name,
                "params_total": summary["params_total"],
                "params_active": summary["params_active"],
                "pattern": cfg.model.pattern,
                "d_model": cfg.model.d_model,
                "seq_len": cfg.data.seq_len,
                "hardware": hardware(path),
            }
        )
    return rows


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_presets(rows: list[dict]) -> str:
    table = [("preset", "params", "active", "d_model", "seq_len", "hardware", "layer pattern")]
    table += [
        (
            r["preset"],
            _count(r["params_total"]),
            _count(r["params_active"]),
            str(r["d_model"]),
            str(r["seq_len"]),
            r["hardware"] or "-",
            r["pattern"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {1, 2, 3, 4}  # numbers
    lines = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in table
    ]
    return "\n".join(
        lines
        + [
            "",
            "params: total, and active per token (MoE); `unroll info PRESET` for each layer.",
            "hardware: what the preset is meant for (its file's `# hardware:` line); the layouts that fit:",
            "  `unroll plan PRESET --nodes N --gpus-per-node G`",
            "train one: `unroll train PRESET [key=value ...]`; `unroll train --keys` lists every key.",
        ]
    )
