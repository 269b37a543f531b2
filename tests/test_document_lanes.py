"""The lanes TNT runs isolated documents in: every token exactly once, each document contiguous, in order,
from a multiple of `align`, and fewer lane positions than one padded row per document."""

import pytest
import torch

from unroll.models.document_lanes import document_lanes


@pytest.mark.parametrize("B,T,p,align", [(2, 20, 0.15, 4), (8, 128, 1 / 30, 64), (4, 512, 1 / 50, 12), (3, 64, 0, 8)])
def test_every_document_lies_whole_in_one_lane_from_an_aligned_start(B, T, p, align):
    g = torch.Generator().manual_seed(T)
    resets = torch.rand(B, T, generator=g) < p
    lanes = document_lanes(resets, align)
    tokens = torch.arange(B * T).view(B, T)
    assert torch.equal(lanes.scatter(lanes.gather(tokens)), tokens)  # each token once
    assert int(lanes.real.sum()) == B * T

    starts = resets.clone()
    starts[:, 0] = True
    documents = []
    for b in range(B):
        edges = starts[b].nonzero().flatten().tolist() + [T]
        documents += [(b, s, e) for s, e in zip(edges[:-1], edges[1:])]
    assert int(lanes.starts.sum()) == len(documents)
    placed = set()
    for lane, at in lanes.starts.nonzero().tolist():
        assert at % align == 0
        b, s = int(lanes.row[lane, at]), int(lanes.position[lane, at])
        e = next(e for d_b, d_s, e in documents if (d_b, d_s) == (b, s))
        span = slice(at, at + e - s)
        assert torch.equal(lanes.position[lane, span], torch.arange(s, e)) and bool(lanes.real[lane, span].all())
        assert bool((lanes.row[lane, span] == b).all())
        placed.add((b, s))
    assert placed == {(b, s) for b, s, _ in documents}
    longest = max(e - s for _, s, e in documents)
    assert lanes.row.shape[1] == longest and lanes.row.numel() <= len(documents) * longest
