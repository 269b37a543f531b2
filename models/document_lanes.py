"""Documents of packed rows laid out in lanes where each starts on a multiple of `align`: a chunkwise memory
(TNT) whose chunks and periodic resets divide `align` then counts them from each document's own first
token, as if the document ran alone, by restarting at the chunks where a document begins. Lanes are as
long as the longest document; the documents, longest first, go into the first lane with room (first-fit
decreasing), each taking its length rounded up to `align` when another follows it. So padding costs under
`align` tokens per document plus the lanes' unused tails, where one document per row, padded to the
longest, would cost every document the longest's length."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Lanes:
    """Where each lane position comes from: row[l, c], position[l, c] in the packed input (padding repeats
    a token of its document); real[l, c] marks the positions that are tokens; starts[l, c] a document's
    first token (a multiple of `align`)."""

    row: torch.Tensor
    position: torch.Tensor
    real: torch.Tensor
    starts: torch.Tensor
    packed: tuple[int, int]  # the rows' B, T

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] → [lanes, length, ...]."""
        return x[self.row, self.position]

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """y [lanes, length, ...] → [B, T, ...] at the real positions (each token once)."""
        out = y.new_zeros(*self.packed, *y.shape[2:])
        return out.index_put((self.row[self.real], self.position[self.real]), y[self.real])


def document_lanes(resets: torch.Tensor, align: int, window: tuple[int, int] | None = None) -> Lanes:
    """The lanes of the documents of rows [B, T] that begin where resets is True (and at t = 0); with
    `window` (lo, hi), only those with a token in columns [lo, hi) (a context rank's slice of the rows),
    each still from its own first token."""
    B, T = resets.shape
    device = resets.device
    starts = resets.clone()
    starts[:, 0] = True
    row, first = starts.nonzero(as_tuple=True)  # row-major: each row's documents in order
    same_row = torch.cat([row[1:] == row[:-1], row.new_zeros(1, dtype=torch.bool)])
    lengths = torch.where(same_row, first.roll(-1), T) - first
    if window is not None:
        lo, hi = window
        keep = (first < hi) & (first + lengths > lo)
        row, first, lengths = row[keep], first[keep], lengths[keep]
    padded = (lengths + align - 1) // align * align  # what a document takes when another follows it
    width = int(lengths.max())
    used: list[int] = []  # first-fit decreasing, on the host: a few hundred documents
    sizes, takes = lengths.tolist(), padded.tolist()
    place = [(0, 0)] * len(sizes)
    for j in torch.argsort(lengths, descending=True, stable=True).tolist():
        lane = next((i for i, end in enumerate(used) if end + sizes[j] <= width), len(used))
        if lane == len(used):
            used.append(0)
        place[j] = (lane, used[lane])
        used[lane] += takes[j]
    lane_of, at = torch.tensor(place, device=device).unbind(1)

    # each lane position's document: the one starting last at or before it (every lane has one at 0)
    start_at = torch.full((len(used), width), -1, dtype=torch.long, device=device)
    start_at[lane_of, at] = at
    begun = start_at.cummax(dim=1).values
    document = torch.zeros_like(start_at)
    document[lane_of, at] = torch.arange(len(sizes), device=device)
    document = document.gather(1, begun)
    within = torch.arange(width, device=device) - begun
    real = within < lengths[document]
    position = first[document] + torch.where(real, within, 0)
    return Lanes(row[document], position, real, start_at >= 0, (B, T))
