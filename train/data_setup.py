"""Opens what a run reads (tokenizer, train and validation shards) and checks it against the config
before any work, so a wrong path or a vocabulary mismatch names the key at fault."""

from __future__ import annotations

from dataclasses import dataclass

from unroll.data.errors import DataError
from unroll.data.loader import PackedDataset, TokenLoader
from unroll.data.shards import TokenShard, check_token_ids, check_vocab
from unroll.data.tokenizer import Tokenizer
from unroll.train.config import Config, ConfigError
from unroll.train.loss import TokenBatch


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: TokenLoader
    valid: PackedDataset | None
    valid_loader: TokenLoader | None
    isolated: bool = False  # model.documents=isolated: batches say where documents begin

    def train_batch(self, start: int, count: int) -> TokenBatch:
        """Global samples start .. start+count-1: [count, seq_len + 1] token ids (and document starts)."""
        return self._read(self.train, start, count)

    def valid_batch(self, start: int, count: int) -> TokenBatch:
        assert self.valid_loader is not None, "no validation data (data.valid) to read"
        return self._read(self.valid_loader, start, count)

    def _read(self, loader: TokenLoader, start: int, count: int) -> TokenBatch:
        if self.isolated:
            return TokenBatch(*loader.get_with_starts(start, count))
        return TokenBatch(loader.get(start, count))


def _open(prefix: str, key: str, cfg: Config, tokenizer: Tokenizer) -> PackedDataset:
    try:
        shard = TokenShard(prefix)
        check_vocab(shard, cfg.model.vocab_size, tokenizer)
        check_token_ids([shard], cfg.model.vocab_size)
        return PackedDataset(shard, cfg.data.seq_len)
    except DataError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def open_run_data(cfg: Config) -> RunData:
    try:
        tokenizer = Tokenizer(cfg.data.tokenizer)
    except DataError as e:
        raise ConfigError(f"config key 'data.tokenizer': {e}") from None
    if cfg.model.vocab_size < tokenizer.vocab_size:  # more rows is a padded vocabulary: fine
        raise ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size}, but the tokenizer "
            f"{cfg.data.tokenizer} has {tokenizer.vocab_size} tokens (it needs at least that)"
        )
    train = [_open(p, f"data.train[{i}]", cfg, tokenizer) for i, p in enumerate(cfg.data.train)]
    weights = list(cfg.data.weights) or [1.0] * len(train)
    loader = TokenLoader(train, weights, seed=cfg.train.seed, shuffle=True)
    valid = _open(cfg.data.valid, "data.valid", cfg, tokenizer) if cfg.data.valid else None
    valid_loader = TokenLoader([valid], [1.0], seed=cfg.train.seed, shuffle=False) if valid else None
    return RunData(tokenizer, loader, valid, valid_loader, isolated=cfg.model.documents == "isolated")
