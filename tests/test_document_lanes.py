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


@pytest.mark.parametrize("window", [(0, 16), (16, 32), (32, 48), (7, 9)])
def test_a_window_keeps_whole_the_documents_that_reach_into_it(window):
    # a context rank's slice [lo, hi) of gathered rows: the documents with a token there, each from its first
    # token (on an earlier rank or not) to its last, and no other
    B, T, align = 3, 48, 4
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [5, 16, 17, 40]] = True  # one starting exactly on the boundary 16
    resets[1, [30]] = True  # one spanning 0 .. 29, another 30 .. 47
    lanes = document_lanes(resets, align, window)
    lo, hi = window
    starts = resets.clone()
    starts[:, 0] = True
    expected = set()
    for b in range(B):
        edges = starts[b].nonzero().flatten().tolist() + [T]
        expected |= {(b, s, e) for s, e in zip(edges[:-1], edges[1:]) if s < hi and e > lo}
    kept = set()
    for lane, at in lanes.starts.nonzero().tolist():
        b, s = int(lanes.row[lane, at]), int(lanes.position[lane, at])
        e = next(e for d_b, d_s, e in expected if (d_b, d_s) == (b, s))
        assert torch.equal(lanes.position[lane, at : at + e - s], torch.arange(s, e)) and at % align == 0
        kept.add((b, s, e))
    assert kept == expected
    tokens = torch.arange(B * T).view(B, T)
    covered = lanes.scatter(lanes.gather(tokens))  # every token of the window, once; nothing of other documents
    assert torch.equal(covered[:, lo:hi], tokens[:, lo:hi])
    assert int(lanes.real.sum()) == sum(e - s for _, s, e in expected)
