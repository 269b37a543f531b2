"""Global sample index -> packed token window: deterministic, resumable, data-parallel, blended.

The trainer thinks in global sample indices: step s consumes samples [s * global_batch,
(s + 1) * global_batch), and data-parallel rank r of w takes a contiguous slice of them
(`rank_slice`). The loader is a pure function of the index, so resuming (on any number of ranks)
is starting from the number of samples consumed; there is no iterator state to save.

Blending: the global index space is cut into blocks of `block_size` (default 4096) samples. In
every block, dataset d gets exactly c_d samples (largest-remainder apportionment of
weight_d * block_size), at positions given by a permutation seeded with (seed, 1_000_003, block).
The k-th sample of dataset d in block b is d's sample number b * c_d + k, so locating any index
costs O(block_size). A dataset's samples are used epoch after epoch; epoch e visits them in the
order of a permutation keyed by (seed, dataset index, e), or in order when shuffle=False.

Orders (`order`): "feistel" (the default) computes each position's sample from the key with a Feistel network
(data/permutation.py): no table, O(1) memory for any dataset size. "numpy-permutation" draws the whole epoch
as `np.random.default_rng([seed, d, e]).permutation(n)` (n int64s per dataset and epoch), the order of runs
started before the Feistel one; a run keeps the order it started with (train/data_order.py).

Documents: `get_with_starts` returns beside each window where documents begin in it, read from the shard's
document index (never by looking for EOS tokens, which a corpus may hold inside a document). Like the tokens,
they are a pure function of the global index: the same for any blend position, resume point or world size.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from .errors import DataError
from .permutation import feistel, round_keys
from .shards import TokenShard

BLOCK_SIZE = 4096
_BLOCK_SALT = 1_000_003  # keeps block permutations apart from per-dataset epoch permutations
ORDERS = ("feistel", "numpy-permutation")  # how a shuffled epoch is ordered (module docstring)
_FEW_ROWS = 4  # a dataset's rows of a batch up to which reading row by row beats one gather (many shards blended)
NEW_RUN_ORDER = "feistel"  # a run that has read no sample yet (train/data_order.py keeps a resumed run's)


class PackedDataset:
    """A shard's token stream (documents in order, EOS-separated) cut into n_samples windows of
    seq_len + 1 tokens at stride seq_len: inputs = window[:-1], targets = window[1:]."""

    def __init__(self, shard: TokenShard | str, seq_len: int) -> None:
        self.shard = shard if isinstance(shard, TokenShard) else TokenShard(shard)
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be at least 1")
        self.seq_len = seq_len
        self.n_samples = (self.shard.n_tokens - 1) // seq_len
        if self.n_samples == 0:
            raise DataError(
                f"token shard {self.shard.prefix!r} has {self.shard.n_tokens} tokens, too few "
                f"for one sample of seq_len {seq_len} (which needs {seq_len + 1})"
            )

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, i: int) -> np.ndarray:
        """Window i: int64 tokens [i * seq_len, i * seq_len + seq_len + 1)."""
        return self.samples(np.array([i]))[0]

    def starts(self, i: int) -> np.ndarray:
        """bool [seq_len + 1] beside window i: True where a document begins at that token (the shard's index)."""
        return self.starts_of(np.array([i]))[0]

    def samples(self, indices: np.ndarray) -> np.ndarray:
        """int64 [len(indices), seq_len + 1]: windows i * seq_len .. i * seq_len + seq_len, one gather (TokenShard.windows)."""
        return self.windows(self._checked(indices))

    def starts_of(self, indices: np.ndarray) -> np.ndarray:
        """bool [len(indices), seq_len + 1]: True where a document begins at that token of window i (the shard's index)."""
        return self.window_starts(self._checked(indices))

    # The loader's reads: its indices come from its own map onto [0, n_samples) and need no second check.
    def windows(self, indices: np.ndarray) -> np.ndarray:
        """samples() of int64 indices known to be in range."""
        return self.shard.windows_in_range(indices * self.seq_len, self.seq_len + 1)

    def window_starts(self, indices: np.ndarray) -> np.ndarray:
        """starts_of() of int64 indices known to be in range."""
        return self.shard.starts_in_windows_in_range(indices * self.seq_len, self.seq_len + 1)

    def read_into(self, i: int, tokens: np.ndarray, starts: np.ndarray | None = None) -> None:
        """Window i (known to be in range) into `tokens` and, if given, its document starts into `starts` (all False
        on entry): TokenShard.window_into."""
        self.shard.window_into(i * self.seq_len, tokens, starts)

    def _checked(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (indices < 0) | (indices >= self.n_samples)
        if bad.any():
            raise IndexError(
                f"sample {indices[bad][0]} out of range for {self.shard.prefix!r} ({self.n_samples} samples)"
            )
        return indices


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder apportionment: integer counts summing to `total`, each within 1 of
    weights * total (weights sum to 1). Ties go to the lower index."""
    quotas = weights * total
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    # Rounded so that remainders equal but for float noise (0.6 * 4096 vs 0.1 * 4096) tie.
    remainders = np.round(quotas - counts, 9)
    counts[np.argsort(-remainders, kind="stable")[:short]] += 1
    return counts


class TokenLoader:
    """Blends PackedDatasets by weight; `get(start, count)` returns global samples
    start .. start + count - 1 as a LongTensor [count, seq_len + 1]."""

    def __init__(
        self,
        datasets: list[PackedDataset],
        weights: list[float],
        *,
        seed: int,
        shuffle: bool = True,
        block_size: int = BLOCK_SIZE,
        order: str = "feistel",
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
        for w in weights:
            if not (math.isfinite(w) and w > 0):
                raise DataError(f"dataset weight {w!r} must be a positive number")
        seq_lens = {ds.seq_len for ds in datasets}
        if len(seq_lens) > 1:
            raise DataError(f"datasets have different seq_len {sorted(seq_lens)}")
        if seed < 0:
            raise ValueError(f"seed {seed} must be non-negative")
        if order not in ORDERS:
            raise DataError(f"sample order {order!r} is not one of {', '.join(ORDERS)}")
        self.datasets = list(datasets)
        self.seq_len = datasets[0].seq_len
        self.seed = int(seed)
        self.shuffle = shuffle
        self.order = order
        self.block_size = block_size
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.counts = apportion(self.weights, block_size)  # samples of each dataset per block
        for w, c in zip(weights, self.counts):
            if c == 0:
                raise DataError(
                    f"dataset weight {w!r} is too small: it rounds to 0 of {block_size} samples "
                    "per block; raise it or the block size"
                )
        # Small caches: a batch touches one or two blocks and one or two epochs per dataset.
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._located_blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._keys: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._sizes = np.array([ds.n_samples for ds in self.datasets], dtype=np.int64)

    def get(self, start: int, count: int) -> torch.Tensor:
        if count == 0 and start >= 0:
            return torch.empty((0, self.seq_len + 1), dtype=torch.long)
        return torch.from_numpy(self._read(self._located(start, count), starts=False)[0])

    def get_with_starts(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`get(start, count)` and beside it a BoolTensor [count, seq_len + 1]: True where a document begins at
        that token of the window. The model's `resets` of inputs window[:, :-1] are starts[:, :-1]."""
        if count == 0 and start >= 0:
            return self.get(start, 0), torch.empty((0, self.seq_len + 1), dtype=torch.bool)
        tokens, starts = self._read(self._located(start, count), starts=True)
        assert starts is not None  # asked for
        return torch.from_numpy(tokens), torch.from_numpy(starts)

    def _located(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, its sample index) of global samples start .. start + count − 1."""
        if start < 0 or count < 0:
            raise IndexError(f"samples [{start}, {start + count}) must start at 0 or later")
        return self.locate(np.arange(start, start + count, dtype=np.int64))

    def _read(self, located: tuple[np.ndarray, np.ndarray], *, starts: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The located samples' tokens int64 [samples, seq_len + 1] and, if asked, their document starts (bool, the
        same shape): a dataset's rows in one gather, or row by row where it has only a few of them."""
        which, index = located
        if len(self.datasets) == 1:
            dataset = self.datasets[0]
            return dataset.windows(index), dataset.window_starts(index) if starts else None
        shape = (len(which), self.seq_len + 1)
        out_tokens, out_starts = np.empty(shape, dtype=np.int64), np.zeros(shape, dtype=bool) if starts else None
        by_dataset = np.argsort(which, kind="stable")
        bounds = [0, *(np.flatnonzero(np.diff(which[by_dataset])) + 1).tolist(), len(which)]
        for rows in (by_dataset[a:b] for a, b in zip(bounds[:-1], bounds[1:])):
            dataset = self.datasets[which[rows[0]]]
            if len(rows) <= _FEW_ROWS:
                for r in rows.tolist():
                    dataset.read_into(int(index[r]), out_tokens[r], None if out_starts is None else out_starts[r])
                continue
            out_tokens[rows] = dataset.windows(index[rows])
            if out_starts is not None:
                out_starts[rows] = dataset.window_starts(index[rows])
        return out_tokens, out_starts

    def locate(self, g: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, sample index within that dataset) of global indices g."""
        g = np.atleast_1d(np.asarray(g, dtype=np.int64))
        if g.size and g.min() < 0:
            raise IndexError(f"sample {g.min()} is negative")
        blocks = g // self.block_size
        if g.size and blocks.min() == blocks.max():  # a batch within one block
            which, index = self._located_block(int(blocks[0]))
            pos = g % self.block_size
            return which[pos], index[pos]
        which, index = np.empty_like(g), np.empty_like(g)
        for b in np.unique(blocks):
            mask = blocks == b
            block_which, block_index = self._located_block(int(b))
            pos = g[mask] % self.block_size
            which[mask], index[mask] = block_which[pos], block_index[pos]
        return which, index

    def _located_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, sample index) of every position of block b, computed for the whole block at once and kept:
        consecutive batches fall in the same block, and the map's numpy calls cost per call, not per element."""
        if b not in self._located_blocks:
            which, rank = self._block(b)
            nth = b * self.counts[which] + rank  # how many of its dataset's samples came before, over all epochs
            sizes = self._sizes[which]
            epoch, k = nth // sizes, nth % sizes  # position k of the dataset's epoch
            if not self.shuffle:
                index = k
            elif self.order == "feistel":  # one pass for every dataset and epoch of the block
                index = feistel(k, sizes, self._round_keys(which, epoch))
            else:
                index = np.empty_like(k)
                for d in np.unique(which):
                    mask = which == d
                    for e in np.unique(epoch[mask]):
                        sel = np.flatnonzero(mask & (epoch == e))
                        index[sel] = self._perm(int(d), int(e))[k[sel]]
            _remember(self._located_blocks, b, (which, index), keep=2)
        return self._located_blocks[b]

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """owner[p]: the dataset at block position p; rank[p]: how many earlier positions that
        dataset owns."""
        if b not in self._blocks:
            owner = np.repeat(np.arange(len(self.datasets)), self.counts)
            if len(self.datasets) > 1:
                owner = np.random.default_rng([self.seed, _BLOCK_SALT, b]).permutation(owner)
            order = np.argsort(owner, kind="stable")
            first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            rank = np.empty_like(owner)
            rank[order] = np.arange(len(owner)) - first[owner[order]]
            _remember(self._blocks, b, (owner, rank), keep=2)
        return self._blocks[b]

    def _round_keys(self, which: np.ndarray, epoch: np.ndarray) -> np.ndarray:
        """uint64 [len(which), rounds]: the Feistel keys of each sample's dataset and epoch."""
        span = int(epoch.max()) + 1 if epoch.size else 1
        pairs, inverse = np.unique(which * span + epoch, return_inverse=True)  # one code per (dataset, epoch)
        rows = []
        for d, e in (divmod(p, span) for p in pairs.tolist()):
            if (d, e) not in self._keys:
                _remember(self._keys, (d, e), round_keys((self.seed, d, e)), keep=2 * len(self.datasets))
            rows.append(self._keys[d, e])
        return np.stack(rows)[inverse.reshape(-1)]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        """numpy-permutation: dataset d's order in `epoch` as a table (position -> sample)."""
        key = (d, epoch)
        if key not in self._perms:
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(self.datasets[d].n_samples)
            _remember(self._perms, key, perm, keep=2 * len(self.datasets))
        return self._perms[key]


def _remember(cache: OrderedDict, key, value, keep: int) -> None:
    cache[key] = value
    while len(cache) > keep:
        cache.popitem(last=False)


def rank_slice(samples_consumed: int, global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of this data-parallel rank's part of the step that starts at global sample
    `samples_consumed`: ranks take consecutive, equal slices of the global batch."""
    if world < 1 or global_batch < 1 or global_batch % world:
        raise ValueError(f"global_batch {global_batch} is not divisible by world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    per_rank = global_batch // world
    return samples_consumed + rank * per_rank, per_rank
