"""The architecture as the README's Layout section draws it: every import of the package runs down the floors,
never up or sideways into a later floor (a module may import its own floor)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN_BASE = {"config", "config_keys", "loss", "schedule", "step_guard", "metrics", "plot", "signals", "watchdog"}
TRAIN_BASE |= {"data_setup", "mfu"}
TRAIN_LOOP = {"trainer", "build", "optim", "step", "evaluate", "rollback", "layer_metrics", "final_report", "preflight"}
TRAIN_LOOP |= {"data_order", "deepspeed_engine"}
# lowest first; a module's floor is the first whose prefix (or train/ module name) matches it
FLOORS = [
    ("configs",),
    ("kernels",),
    ("data",),
    ("models",),
    tuple(f"train.{m}" for m in sorted(TRAIN_BASE)),
    ("train.parallel",),
    ("train.checkpoint",),
    tuple(f"train.{m}" for m in sorted(TRAIN_LOOP)),
    ("train.lifecycle", "train.planning"),
    ("launch",),
]


def floor_of(module: str) -> int:
    for i, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"unroll.{module} is on no floor: add it to tests/test_layout.py and the README's Layout")


def package_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n.removeprefix("unroll.") for n in names if n.startswith("unroll.")}
    return found


def modules() -> dict[str, Path]:
    out = {}
    for top in ("configs", "kernels", "data", "models", "train", "launch"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    del out["train"]  # the empty package around the rooms
    return out


def test_every_import_runs_down_the_floors():
    known = modules()
    upward = []
    for name, path in known.items():
        here = floor_of(name)
        for target in package_imports(path):
            if target not in known:  # `from unroll.x import name`: the name, not a module
                continue
            if floor_of(target) > here:
                upward.append(f"{name} (floor {here}) imports {target} (floor {floor_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_floors_cover_every_module_and_catch_an_upward_import():
    assert all(floor_of(name) >= 0 for name in modules())
    assert floor_of("train.parallel.mesh") > floor_of("train.loss")
    assert floor_of("train.trainer") > floor_of("train.checkpoint.dcp") > floor_of("train.parallel.pipeline")
