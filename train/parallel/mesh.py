"""The device mesh: named dimensions from `parallel.*`, checked against the world size and the model.

Dimensions, outermost first (torchtitan's order, so that the innermost — tensor parallel, the most
communication — lands on ranks of one node):

    pp            pipeline stages
    dp_replicate  data-parallel replicas (gradients all-reduced)
    dp_shard      data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2)
    cp            context parallel: the sequence split over ranks (sequence-parallel Newton)
    tp            tensor parallel

Flattened views for the collectives that span several dimensions: "dp" (dp_replicate × dp_shard: the
ranks that see different samples), "dp_shard_cp" (where FSDP shards: parameters are also replicated
over cp, whose ranks see the same samples), and "ep" is carved out of dp_shard × cp.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from unroll.models.config import ModelConfig
from unroll.train.config import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message names the `parallel.*` key at fault."""


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return math.prod(getattr(self, d) for d in DIMS)

    @property
    def dp(self) -> int:
        """Ranks that see different samples: the batch is split over these."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        return " × ".join(f"{d} {getattr(self, d)}" for d in DIMS + ("ep",) if getattr(self, d) > 1) or "one rank"


def resolve_layout(parallel, world: int) -> Layout:
    """The layout `parallel` (a ParallelConfig) asks for on `world` ranks, dp_shard=-1 filled in."""
    sizes = {d: getattr(parallel, d) for d in DIMS + ("ep",)}
    for key, value in sizes.items():
        if value < 1 and not (key == "dp_shard" and value == -1):
            raise LayoutError(f"parallel.{key}: must be positive (dp_shard may be -1), got {value}")
    fixed = math.prod(v for k, v in sizes.items() if k in DIMS and k != "dp_shard")
    if sizes["dp_shard"] == -1:
        if world % fixed:
            raise LayoutError(
                f"parallel: the world size {world} is not divisible by pp × dp_replicate × cp × tp "
                f"= {fixed}, so parallel.dp_shard=-1 cannot fill it"
            )
        sizes["dp_shard"] = world // fixed
    layout = Layout(**sizes)
    if layout.world != world:
        raise LayoutError(
            "parallel: pp × dp_replicate × dp_shard × cp × tp = "
            + " × ".join(str(getattr(layout, d)) for d in DIMS)
            + f" = {layout.world} ranks, but the world size is {world}"
        )
    if (layout.dp_shard * layout.cp) % layout.ep:
        raise LayoutError(f"parallel.ep={layout.ep} must divide dp_shard × cp = {layout.dp_shard * layout.cp}")
    return layout


def check_model(layout: Layout, model: ModelConfig, seq_len: int | None = None) -> None:
    """What the model's shapes allow: heads, widths and the vocabulary divisible by tp, experts by ep,
    layers ≥ stages, the sequence by cp."""
    problems = []
    if seq_len is not None and layout.cp > 1:
        if seq_len % layout.cp:
            problems.append(f"parallel.cp={layout.cp} must divide data.seq_len={seq_len}")
        elif "M" in model.layers and seq_len // layout.cp < model.m2rnn.conv - 1:
            problems.append(
                f"parallel.cp={layout.cp}: slices of {seq_len // layout.cp} tokens are shorter than "
                f"the M²RNN convolution's reach ({model.m2rnn.conv - 1})"
            )
        # with isolated documents TNT gathers the slices and runs whole documents (models/tnt.py): no constraint
        if "T" in model.layers and model.documents == "packed" and seq_len % layout.cp == 0:
            problems += tnt_context_problems(model, seq_len // layout.cp, layout.cp)
    kinds = set(model.layers)
    if layout.tp > 1:
        if seq_len is not None and seq_len % layout.tp:
            problems.append(f"parallel.tp={layout.tp} must divide data.seq_len={seq_len} (sequence-parallel norms)")
        if model.vocab_size % layout.tp:
            problems.append(
                f"parallel.tp={layout.tp} must divide model.vocab_size={model.vocab_size} (the embedding "
                f"and head are split over the vocabulary)"
            )
        if "A" in kinds and (model.n_heads % layout.tp or model.kv_heads % layout.tp):
            problems.append(
                f"parallel.tp={layout.tp} must divide model.n_heads={model.n_heads} and the kv heads {model.kv_heads}"
            )
        if kinds & {"G", "L"} and model.rnn_dim % layout.tp:
            problems.append(f"parallel.tp={layout.tp} must divide the recurrent width {model.rnn_dim}")
        if "T" in kinds:
            problems.append(f"parallel.tp={layout.tp} with TNT layers (pattern T): not available yet")
        if "M" in kinds and (model.m2rnn_v_heads % layout.tp):
            problems.append(f"parallel.tp={layout.tp} must divide the M²RNN value heads {model.m2rnn_v_heads}")
        if "D" in model.mlp_kinds and model.mlp_width % layout.tp:
            problems.append(f"parallel.tp={layout.tp} must divide the MLP width {model.mlp_width}")
    if layout.ep > 1 and ("E" not in model.mlp_kinds or model.moe.experts % layout.ep):
        problems.append(
            f"parallel.ep={layout.ep} needs MoE layers whose model.moe.experts ({model.moe.experts}) it divides"
        )
    if layout.pp > len(model.layers):
        problems.append(f"parallel.pp={layout.pp} stages for {len(model.layers)} layers")
    if problems:
        raise LayoutError("; ".join(problems))


def tnt_context_problems(model: ModelConfig, per_rank: int, cp: int) -> list[str]:
    """TNT under context parallelism: each rank's slice must start fresh local memories (model.tnt.local_reset
    divides it) and a global chunk (model.tnt.global_chunk divides it)."""
    t, out = model.tnt, []
    if t.local_chunks and (not t.local_reset or per_rank % t.local_reset):
        out.append(
            f"parallel.cp={cp}: TNT's model.tnt.local_reset={t.local_reset} must be positive and divide "
            f"the per-rank sequence length {per_rank} (local memories are not handed between ranks)"
        )
    if t.global_chunk and per_rank % t.global_chunk:
        out.append(
            f"parallel.cp={cp}: TNT's model.tnt.global_chunk={t.global_chunk} must divide the per-rank "
            f"sequence length {per_rank}"
        )
    return out


def not_yet(layout: Layout) -> list[str]:
    """The combinations the trainer cannot run yet, each naming its keys (empty when it can run). One list
    for the trainer's refusal and `unroll plan`'s candidates, so a plan never recommends what fails."""
    missing = []
    if layout.ep > 1 and (layout.dp_shard % layout.ep or layout.cp > 1 or layout.tp > 1 or layout.pp > 1):
        missing.append(f"parallel.ep={layout.ep}: only ep dividing dp_shard, without cp, tp or pp")
    return missing


def check_supported(layout: Layout) -> None:
    missing = not_yet(layout)
    if missing:
        raise LayoutError(f"not available yet: {'; '.join(missing)} (got {layout.describe()})")


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh | None:
    """The named mesh over all ranks (None for one process), with the flattened views above."""
    if layout.world == 1:
        return None
    mesh = init_device_mesh(device_type, tuple(getattr(layout, d) for d in DIMS), mesh_dim_names=DIMS)
    # torch 2.13 warns, on every slice of a flattened dimension ("dp", "dp_shard_cp", "dp_cp") from the root
    # mesh, that such slicing is to be deprecated. It still returns the flattened group, and nothing a user
    # runs can act on the warning; if torch drops the slicing, it fails loudly rather than silently.
    warnings.filterwarnings(
        "ignore",
        message=r"Slicing a flattened dim from root mesh",
        category=UserWarning,
        module=r"torch\.distributed\.device_mesh",
    )
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")  # where gradients are reduced
    return mesh


def mesh_coordinates(mesh: DeviceMesh | None) -> dict[str, int]:
    """This rank's index along each named dimension (all 0 for one process)."""
    if mesh is None:
        return {d: 0 for d in DIMS}
    return {d: mesh.get_local_rank(d) for d in DIMS}


def data_ranks(mesh: DeviceMesh | None, layout: Layout) -> dict[str, int]:
    """Which samples this rank trains on (its index among the dp ranks) and which slice of them (cp)."""
    if mesh is None:
        return {"dp": 0, "dp_size": 1, "cp": 0, "cp_size": 1}
    return {
        "dp": mesh["dp"].get_local_rank(),
        "dp_size": layout.dp,
        "cp": mesh["cp"].get_local_rank(),
        "cp_size": layout.cp,
    }


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
