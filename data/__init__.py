"""unroll.data: corpus -> tokenizer -> token shards -> packed, blended, resumable batches.

- corpus.py     read_documents: txt/jsonl/json/parquet files or a bundled corpus -> datasets.Dataset
- tokenizer.py  train_tokenizer, Tokenizer: lossless sentencepiece BPE/unigram
- shards.py     prepare_shards, TokenShard, check_vocab, check_token_ids: Megatron indexed datasets (.bin/.idx)
- loader.py     PackedDataset, TokenLoader, rank_slice: global sample index -> tokens

Heavy dependencies (datasets, megatron-core) are imported inside the functions that need them.
"""

from .errors import DataError

__all__ = ["DataError"]
