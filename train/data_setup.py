"""Opens what a run reads (tokenizer, train and validation shards) and checks it against the config
before any work, so a wrong path or a vocabulary mismatch names the key at fault.

An entry of data.train (and data.valid) is a shard prefix or a directory `unroll data prepare` wrote: its train
(valid) shards in order, each a PackedDataset, blended with weights proportional to their tokens that sum to
the entry's weight (data.weights; equal per entry when none are given). A directory's shards too short for one
sample of data.seq_len (a last shard may hold a few documents) are left out; a shard prefix named alone is not."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from unroll.data.errors import DataError
from unroll.data.loader import NEW_RUN_ORDER, PackedDataset, TokenLoader
from unroll.data.manifest import PreparedShard, prepared_shards
from unroll.data.prefetch import Prefetcher, Request
from unroll.data.shards import TokenShard, check_token_ids, check_vocab
from unroll.data.tokenizer import SpecialTokenError, Tokenizer, load_tokenizer
from unroll.train.config import Config, ConfigError
from unroll.train.loss import TokenBatch


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: TokenLoader
    valid: ValidationSet | None
    valid_loader: TokenLoader | None
    isolated: bool = False  # model.documents=isolated: batches say where documents begin

    def train_batch(self, start: int, count: int, pin: bool = False) -> TokenBatch:
        """Global samples start .. start+count-1: [count, seq_len + 1] token ids (and document starts); pin: in
        page-locked memory, which a CUDA device copies from without staging."""
        batch = self._read(self.train, start, count)
        if not pin:
            return batch
        return TokenBatch(batch.tokens.pin_memory(), None if batch.starts is None else batch.starts.pin_memory())

    def train_reader(self, planned: Iterable[Request], depth: int, pin: bool) -> Prefetcher[TokenBatch]:
        """train_batch, read `depth` requests ahead along `planned` in a thread (data/prefetch.py)."""
        return Prefetcher(lambda start, count: self.train_batch(start, count, pin), planned, depth)

    def valid_batch(self, start: int, count: int) -> TokenBatch:
        assert self.valid_loader is not None, "no validation data (data.valid) to read"
        return self._read(self.valid_loader, start, count)

    def _read(self, loader: TokenLoader, start: int, count: int) -> TokenBatch:
        if self.isolated:
            return TokenBatch(*loader.get_with_starts(start, count))
        return TokenBatch(loader.get(start, count))


@dataclass
class ValidationSet:
    """The validation shards (data.valid: one, or a prepared directory's); evaluation reads the first samples of
    their blend (valid_loader), each shard weighted by its samples."""

    parts: list[PackedDataset]

    @property
    def n_samples(self) -> int:
        return sum(part.n_samples for part in self.parts)


def _shards(entry: str, split: str, key: str, seq_len: int) -> list[PreparedShard]:
    """The shards a config entry names: a prefix is one shard, a prepared directory its `split` shards that hold
    a sample."""
    if not os.path.isdir(entry):
        return [PreparedShard(entry, 0)]  # its tokens are not needed: one shard takes the entry's whole weight
    try:
        shards = prepared_shards(entry, split)
    except DataError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    usable = [shard for shard in shards if shard.tokens > seq_len]
    if not usable:
        raise ConfigError(
            f"config key '{key}': no {split} shard of {entry!r} holds the {seq_len + 1} tokens of one sample "
            f"of data.seq_len {seq_len} (the largest holds {max(shard.tokens for shard in shards)})"
        )
    return usable


def _open(prefix: str, key: str, cfg: Config, tokenizer: Tokenizer) -> PackedDataset:
    try:
        shard = TokenShard(prefix)
        check_vocab(shard, cfg.model.vocab_size, tokenizer)
        check_token_ids([shard], cfg.model.vocab_size)
        return PackedDataset(shard, cfg.data.seq_len)
    except DataError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def open_tokenizer(cfg: Config) -> Tokenizer:
    """data.tokenizer, with the EOS that data.eos_token names (HF tokenizers)."""
    try:
        return load_tokenizer(cfg.data.tokenizer, eos_token=cfg.data.eos_token)
    except SpecialTokenError as e:
        raise ConfigError(f"config key '{'data.' + e.key if e.given else 'data.tokenizer'}': {e}") from None
    except DataError as e:
        raise ConfigError(f"config key 'data.tokenizer': {e}") from None


def open_run_data(cfg: Config) -> RunData:
    tokenizer = open_tokenizer(cfg)
    if cfg.model.vocab_size < tokenizer.vocab_size:  # more rows is a padded vocabulary: fine
        raise ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size}, but the tokenizer "
            f"{cfg.data.tokenizer} has {tokenizer.vocab_size} tokens (it needs at least that; data.vocab_multiple=64 "
            f"sets it from the tokenizer)"
        )
    train: list[PackedDataset] = []
    weights: list[float] = []
    for i, (entry, weight) in enumerate(zip(cfg.data.train, list(cfg.data.weights) or [1.0] * len(cfg.data.train))):
        shards = _shards(entry, "train", f"data.train[{i}]", cfg.data.seq_len)
        total = sum(shard.tokens for shard in shards)
        for shard in shards:
            train.append(_open(shard.prefix, f"data.train[{i}]", cfg, tokenizer))
            weights.append(weight * shard.tokens / total if len(shards) > 1 else weight)
    # data.order "": a new run's (the trainer resolves it against run.dir's checkpoints first, train/data_order.py)
    loader = TokenLoader(train, weights, seed=cfg.train.seed, shuffle=True, order=cfg.data.order or NEW_RUN_ORDER)
    valid = None
    if cfg.data.valid:
        shards = _shards(cfg.data.valid, "valid", "data.valid", cfg.data.seq_len)
        valid = ValidationSet([_open(shard.prefix, "data.valid", cfg, tokenizer) for shard in shards])
    valid_loader = (
        TokenLoader(valid.parts, [part.n_samples for part in valid.parts], seed=cfg.train.seed, shuffle=False)
        if valid
        else None
    )
    return RunData(tokenizer, loader, valid, valid_loader, isolated=cfg.model.documents == "isolated")
