"""unroll.data: corpus -> tokenizer -> token shards -> packed, blended, resumable batches.

- corpus.py     read_documents: txt/jsonl/json/parquet files or a bundled corpus -> datasets.Dataset
- stream.py     corpus_files, read_records: the same files (and .gz/.zst) streamed, resumable at any record
- tokenizer.py  Tokenizer, load_tokenizer: any kind opened by its path; tokenizer_in: a directory's copy
- sentencepiece_tokenizer.py  train_tokenizer, SentencePieceTokenizer: lossless sentencepiece BPE/unigram
- hf_tokenizer.py  HFTokenizer: a tokenizer.json (Llama 3, GPT-NeoX, Qwen ...) and its EOS/BOS
- hf_bpe.py     train_hf_bpe: a lossless byte-level BPE of HF tokenizers (`--kind hf-bpe`)
- encode_pool.py  encode_in_order: batches of texts -> ids in worker processes, in input order
- prepare.py    prepare_shards: corpus -> train/valid .bin/.idx + meta.json (`unroll data prepare`)
- prepare_dir.py  prepare_directory: corpus -> a resumable directory of shards (`--shard-tokens`)
- manifest.py   the directory's manifest.json; prepared_shards: a directory's shards for training
- shards.py     TokenShard, check_vocab, check_token_ids: Megatron indexed datasets (.bin/.idx)
- loader.py     PackedDataset, TokenLoader, rank_slice: global sample index -> tokens
- permutation.py  FeistelPermutation, feistel: the epoch order, a keyed bijection computed per index
- prefetch.py   Prefetcher: the next batches read in a background thread

Heavy dependencies (datasets, megatron-core) are imported inside the functions that need them.
"""

from .errors import DataError

__all__ = ["DataError"]
