"""What one block of each kind keeps per token, measured on the real block: the figures `unroll plan`
multiplies by the tokens and layers of a layout (train/planning/plan.py).

A language model of one block per distinct (mixer, MLP) kind of the config, at the config's full widths and
a vocabulary of 1024 entries (varied tokens, so a MoE's router spreads them), is built on the meta device, tensor parallelism applied with the trainer's
own plans when tp > 1 and its experts split over ep ranks when ep > 1 (in a fake process group of
tp × ep ranks whose collectives train/planning/fake_comm.py answers: a MoE's transients, e.g. its experts' weight
gradients, are of the experts a rank holds),
allocated with small random weights (what memory holds depends on the shapes, and on Newton iterating at
all, which zero weights would spare it), and run forward and backward on `tokens` tokens under torch's memory tracker, in the precision of the job (bf16 autocast; bf16 weights
as FSDP2 gathers them, or fp32 weights cast per call). Per kind:

    saved   bytes per token that the block's forward leaves behind for the backward (the tracker's
            activations after the block's forward, minus before)
    extra   bytes per token above that at the block's own peak: Newton's or the loss-free transients of
            its forward, or its backward's gradients and recomputation, whichever is larger
    inputs  bytes per token of the block's input (what activation checkpointing keeps of it)

and for the loss, bytes per logit of one chunk (kernels/cross_entropy.py on a small vocabulary slice).
Costs a block's weights once per kind (about 0.4 GB at 7B) and a second or two.

fp32 weights under bf16 autocast (layouts without FSDP) add a part per block that does not grow with the
tokens: autocast keeps a bf16 copy of every weight it casts until the forward ends (and the recomputed
block's in its backward). Spread over the probe's few tokens it would be read as ~10× the per-token cost
at a real length (paragru-1b on one H200: 2.2× the whole step's peak), so there the block is probed at two
token counts and the bytes fitted as fixed + per token × tokens (`saved_fixed`, `extra_fixed`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import torch

from unroll.models.config import ModelConfig

if TYPE_CHECKING:  # imported where used: torch's models load only when a probe runs
    from unroll.models.lm import Block
from unroll.train.planning.memory import TRANSIENT, Tracker, snapshot_sums

MAX_PROBE_TOKENS = 256  # per sequence: enough chunks for every mixer's per-token cost to settle
MAX_PROBE_BATCH_TOKENS = 1024  # sequences × tokens: a per-sequence part (M²RNN's recomputed chunk) scales
# with the micro-batch's sequences, so they are probed as the job has them, up to this many tokens


@dataclass(frozen=True)
class KindCost:
    """Bytes per token, and bytes per block that do not grow with the tokens (module docstring)."""

    saved: float
    extra: float
    inputs: float
    saved_fixed: float = 0.0
    extra_fixed: float = 0.0


def kinds(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The distinct (mixer, MLP) kinds of the config's layers, in first-appearance order."""
    seen = []
    for kind in zip(cfg.layers, cfg.mlp_kinds):
        if kind not in seen:
            seen.append(kind)
    return seen


_CACHE: dict[tuple, dict] = {}


def probe(
    cfg: ModelConfig,
    tp: int,
    bf16_weights: bool,
    autocast_bf16: bool,
    tokens: int,
    recompute: str = "none",
    batch: int = 1,
    ep: int = 1,
) -> dict[tuple[str, str], KindCost]:
    """KindCost of every kind of `cfg` under tp (module docstring), on `batch` sequences of `tokens` tokens
    (per token it settles once the mixers' chunks are several: M²RNN's 32-step checkpoints, TNT's chunks),
    with activation checkpointing `recompute` (none | full | mlp); measured once per process."""
    tokens = min(tokens, MAX_PROBE_TOKENS)
    batch = max(1, min(batch, MAX_PROBE_BATCH_TOKENS // tokens))
    ep = ep if cfg.mlp_kinds.count("E") else 1
    key = (repr(cfg), tp, bf16_weights, autocast_bf16, tokens, recompute, batch, ep)
    if key not in _CACHE:
        _CACHE[key] = _probe(cfg, tp, bf16_weights, autocast_bf16, tokens, recompute, batch, ep)
    return _CACHE[key]


def _probe(
    cfg: ModelConfig, tp: int, bf16_weights: bool, autocast_bf16: bool, tokens: int, recompute: str, batch: int, ep: int
) -> dict[tuple[str, str], KindCost]:
    out = {}
    # the residual stream: bf16 when the embedding's weights are; under sequence parallelism (tp) a rank
    # holds T/tp of its tokens
    inputs = cfg.d_model * (2 if bf16_weights else 4) / tp
    for kind in kinds(cfg):
        saved, extra = _probe_kind(cfg, kind, tp, bf16_weights, autocast_bf16, tokens, recompute, batch, ep)
        n = batch * tokens
        if not (autocast_bf16 and not bf16_weights):
            out[kind] = KindCost(saved / n, extra / n, inputs)
            continue
        # a second point with half the sequences (or half the tokens of one): the fixed part is the rest
        batch2, tokens2 = (batch // 2, tokens) if batch > 1 else (1, max(tokens // 2, 2 * tp))
        saved2, extra2 = _probe_kind(cfg, kind, tp, bf16_weights, autocast_bf16, tokens2, recompute, batch2, ep)
        n2 = batch2 * tokens2
        per_saved, per_extra = max(saved - saved2, 0) / (n - n2), max(extra - extra2, 0) / (n - n2)
        out[kind] = KindCost(
            per_saved, per_extra, inputs, max(saved - per_saved * n, 0.0), max(extra - per_extra * n, 0.0)
        )
    return out


def _probe_kind(
    cfg: ModelConfig,
    kind: tuple[str, str],
    tp: int,
    bf16_weights: bool,
    autocast_bf16: bool,
    tokens: int,
    recompute: str,
    batch: int,
    ep: int = 1,
) -> tuple[float, float]:
    """Two blocks of one kind in an LM on `batch` sequences of `tokens` tokens: (what each keeps after its
    forward, what the step adds above the two at its largest moment outside the loss: memory.Phases),
    bytes."""
    from torch.distributed._tools.mem_tracker import _ModState

    from unroll.models import LM
    from unroll.train.planning.fake_comm import SymmetricWorld, fake_process_group
    from unroll.train.planning.memory import mark_phases

    # a vocabulary of a thousand entries: enough different tokens for a MoE's router to spread them (all
    # alike, they would all go to the same experts, which in a symmetric world of ep ranks is 64× the rows)
    small = replace(cfg, pattern=kind[0] * 2, mlp_pattern=kind[1] * 2, vocab_size=1024 * tp)
    seq = max(tokens, tp) - max(tokens, tp) % tp
    ep = ep if kind[1] == "E" else 1
    group = fake_process_group(0, tp * ep) if tp * ep > 1 else contextlib.nullcontext()
    with group, SymmetricWorld() if tp * ep > 1 else contextlib.nullcontext():
        with torch.device("meta"):
            model = LM(small)
        if tp * ep > 1:  # as train/parallel/parallelize.py applies them: tensor parallelism, then the experts split
            from torch.distributed.device_mesh import init_device_mesh

            from unroll.train.parallel.expert_parallel import apply_expert_parallel_to_model
            from unroll.train.parallel.tensor_parallel import apply_tensor_parallel

            mesh = init_device_mesh("cpu", (ep, tp), mesh_dim_names=("ep", "tp"))
            if tp > 1:
                apply_tensor_parallel(model, mesh["tp"])
            if ep > 1:
                apply_expert_parallel_to_model(model, mesh["ep"].get_group())
        for block in model.blocks:
            cast("Block", block).recompute = recompute
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # small random weights, unit norms: what the bytes depend on is the
            # shapes, but zero weights would let Newton stop before its first iteration
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                local = t.to_local() if hasattr(t, "to_local") else t
                if "norm" in name:
                    local.fill_(1.0)
                elif t.dtype.is_floating_point and not name.endswith("expert_bias"):
                    local.normal_(0.0, 0.02, generator=gen)
                else:
                    local.zero_()
        if bf16_weights:
            model.to(torch.bfloat16)
        tokens_in = torch.randint(0, small.vocab_size, (batch, seq), generator=gen)
        tracker = Tracker()
        hooks = mark_phases(tracker, [model])
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(tokens_in, targets=tokens_in)
            aux = model.aux_loss()  # as the training step adds it (its graph reaches into the blocks)
            (loss if aux is None else loss + aux).backward()
        for h in hooks:
            h.remove()
    # what the first block leaves behind for the second: its output, what autograd keeps of it (its own
    # returned state is let go by then)
    first, second = (
        snapshot_sums(tracker.memory_tracking[b].snapshots[_ModState.PRE_FW][0], TRANSIENT) for b in model.blocks
    )
    saved = second - first
    peak = max(tracker.transient["forward"], tracker.transient["backward"])
    return saved, max(peak - 2 * saved, 0)  # bytes at `seq` tokens


_LOGITS: dict[tuple, tuple[float, float]] = {}


def logit_bytes(autocast_bf16: bool, bf16_weights: bool, tp: int = 1, chunked: bool = False) -> tuple[float, float]:
    """(bytes per logit, bytes per element of the output matrix) at the loss's peak, measured on
    kernels/cross_entropy.py at two chunk lengths (one chunk, or with `chunked` two checkpointed chunks,
    whose backward recomputes one chunk's logits beside the other's gradient); under tp its
    vocabulary-parallel form, in a fake group. The second figure is a temporary as large as the matrix
    the backward makes (the chunk's logits' gradient times it)."""
    key = (autocast_bf16, bf16_weights, tp > 1, chunked)
    if key not in _LOGITS:
        vocab, d = 4096, 256
        (r1, b1), (r2, b2) = [
            (rows, _loss_peak(autocast_bf16, bf16_weights, tp > 1, chunked, rows, vocab, d)) for rows in (64, 128)
        ]
        per_logit = (b2 - b1) / ((r2 - r1) * vocab)
        _LOGITS[key] = (per_logit, max(b1 - per_logit * r1 * vocab, 0.0) / (vocab * d))
    return _LOGITS[key]


def _loss_peak(
    autocast_bf16: bool, bf16_weights: bool, parallel: bool, chunked: bool, rows: int, vocab: int, d: int
) -> int:
    from unroll.kernels.cross_entropy import chunked_cross_entropy
    from unroll.train.planning.fake_comm import SymmetricWorld, fake_process_group

    weight = torch.zeros(vocab, d, dtype=torch.bfloat16 if bf16_weights else torch.float32)
    tokens = 2 * rows if chunked else rows
    hidden = torch.zeros(tokens, d, requires_grad=True)
    targets = torch.zeros(tokens, dtype=torch.long)
    with (
        fake_process_group(0, 2) if parallel else contextlib.nullcontext() as group,
        SymmetricWorld() if parallel else contextlib.nullcontext(),
    ):
        tracker = Tracker()
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            chunked_cross_entropy(hidden, weight, targets, chunk=rows if chunked else 0, group=group).backward()
    return snapshot_sums(tracker.get_tracker_snapshot("peak"), TRANSIENT)
