"""Layouts of tensor-parallel parameters: a torch Placement, or `Fused` for a fused projection's dimension.

Fused dimensions. A fused projection's output rows are segments ([q | k | v], [gate | up], ...); a rank must
hold the same heads of every segment, which is not a contiguous block. Where the segments are equal and all
split (gate|up, MoE gate|up, qkv without GQA, M²RNN's conv when q/k are split and G·K = H·V) the parameter
is a DTensor with torch's `_StridedShard(dim, split_factor=segments)`: its local tensor is exactly
[segment 0 part r | segment 1 part r | ...], its full_tensor() is the single-device layout, and each rank
stores 1/tp of it. Where segments differ in size or split (GQA qkv; M²RNN's in_proj, and its conv
otherwise) no DTensor placement describes the rows a rank needs, so the parameter is stored whole
(Replicate) and each rank computes with its rows only; its gradient is all-reduced over tp in the backward
(each rank's gradient holds its rows). For the M²RNN 7B preset that is ~6.9M of ~10.1M mixer weights per
layer kept whole on every tp rank (the MoE experts, most of the model, are split). No weight is permuted:
checkpoints keep the single-device layout, see train/checkpoint/views.py for DCP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import Placement, Replicate, Shard

from unroll.train.parallel.dtensor_internals import _StridedShard


class TensorParallelError(ValueError):
    """A model whose shapes the tp size does not divide; the message names the module and the size."""


def need(ok: bool, message: str) -> None:
    if not ok:
        raise TensorParallelError(message)


@dataclass(frozen=True)
class Fused:
    """A dimension made of concatenated segments (a fused projection). Each segment is (size, parts): it is
    cut into `parts` equal pieces and rank r uses piece r·parts // tp, so parts = tp splits it over the
    ranks and parts = 1 gives every rank all of it. Rank r's local rows are its pieces, in segment order."""

    dim: int
    segments: tuple[tuple[int, int], ...]

    def strided(self, tp: int) -> bool:
        """Whether a DTensor placement describes it: equal segments, each split over the tp ranks."""
        return len({size for size, _ in self.segments}) == 1 and all(parts == tp for _, parts in self.segments)

    def placement(self, tp: int) -> Placement:
        if not self.strided(tp):
            return Replicate()  # stored whole; each rank selects its rows (see select)
        n = len(self.segments)
        return Shard(self.dim) if n == 1 else _StridedShard(self.dim, split_factor=n)

    def check(self, shape: torch.Size, tp: int, name: str) -> None:
        if sum(size for size, _ in self.segments) != shape[self.dim]:
            raise AssertionError(f"{name}: segments {self.segments} do not add up to dim {self.dim} of {tuple(shape)}")
        for size, parts in self.segments:
            if size % parts or (tp % parts and parts % tp):
                raise AssertionError(f"{name}: segment of {size} in {parts} parts on {tp} ranks")

    def select(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        pieces, start = [], 0
        for size, parts in self.segments:
            n = size // parts
            pieces.append(full.narrow(self.dim, start + (rank * parts // tp) * n, n))
            start += size
        return torch.cat(pieces, dim=self.dim)


Layout = Placement | Fused
