"""Run by tests/test_init.py under torchrun (2 ranks, gloo): every tiny preset built by the trainer's own
path (meta device → layout → only this rank's part allocated and initialised) under dp_shard 2, tp 2,
pp 2 and ep 2, gathered back to whole tensors and compared bit for bit with the one-process build.

    torchrun --standalone --nproc-per-node 2 tests/init_worker.py OUT_DIR

Writes OUT_DIR/rank{r}.json: {"<preset>/<layout>": {"tensors": n, "mismatched": [names], "missing": [names],
"local_elements": elements this rank allocated, "total_elements": the model's} or {"refused": message}}.
"""

import faulthandler
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from unroll.launch.torchrun import finish_rank

LAYOUTS = {
    "dp_shard2": [],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.pp_schedule=GPipe"],
    "ep2": ["parallel.ep=2"],
}
PRESETS = ["tiny-gru", "tiny-lstm", "tiny-m2rnn", "tiny-moe", "tiny-transformer", "tiny-tnt"]


def whole(name: str, p: torch.Tensor) -> torch.Tensor:
    """The full tensor from this rank's part: DTensors gathered, expert shards all-gathered over ep."""
    if isinstance(p, DTensor):
        return p.full_tensor()
    mesh = getattr(p, "ep_mesh", None)
    if mesh is not None:
        parts = [torch.empty_like(p) for _ in range(mesh["ep"].size())]
        dist.all_gather(parts, p.detach().contiguous(), group=mesh["ep"].get_group())
        return torch.cat(parts)
    return p.detach()


def check(preset: str, overrides: list[str], rank: int) -> dict:
    from unroll.models import LM
    from unroll.train.build import build_training
    from unroll.train.config import load_config
    from unroll.train.parallel.distributed import DistInfo
    from unroll.train.parallel.mesh import LayoutError, check_model, check_supported, resolve_layout

    cfg = load_config(preset, overrides + ["train.seed=11"])
    layout = resolve_layout(cfg.parallel, dist.get_world_size())
    try:
        check_model(layout, cfg.model)
        check_supported(layout)
    except LayoutError as e:
        return {"refused": str(e)}
    run = build_training(cfg, DistInfo(rank, 2, rank, torch.device("cpu")), layout, micro=1, accum=2)
    got = {}
    for module in run.pipe.modules if run.pipe else [run.model]:
        named = list(module.named_parameters()) + list(module.named_buffers())
        got |= {("embed.weight" if n == "tied_embed_weight" else n, n): whole(n, p) for n, p in named}
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in run.owned.parameters())
    # every rank's tensors reach rank 0 (pipeline stages hold different ones)
    everyone = [None] * 2
    dist.all_gather_object(everyone, {k: v for k, v in got.items()})
    reference = LM(cfg.model, seed=cfg.train.seed).state_dict()
    seen, mismatched = set(), []
    for part in everyone:
        for (name, shown), t in part.items():
            seen.add(name)
            if not torch.equal(t, reference[name]):
                mismatched.append(shown)
    return {
        "tensors": len(seen),
        "mismatched": sorted(set(mismatched)),
        "missing": sorted(set(reference) - seen),
        "local_elements": local,
        "total_elements": sum(t.numel() for t in reference.values()),
    }


def main() -> None:
    faulthandler.dump_traceback_later(300, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result = {}
    try:
        for preset in PRESETS:
            for name, overrides in LAYOUTS.items():
                if name == "ep2" and preset != "tiny-moe":
                    continue
                result[f"{preset}/{name}"] = check(preset, overrides, rank)
    except Exception:
        result = {"error": traceback.format_exc()}
    finish_rank(sys.argv[1], rank, result)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
