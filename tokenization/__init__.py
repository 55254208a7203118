"""Tokenizer training/loading, text readers, document packing and the token shard writer.

Public API:
- `tokenization.tokenizer`: `train_tokenizer`, `load_tokenizer`, `fingerprint`, `vocab_size`, `eos_id`
- `tokenization.readers`: `expand_inputs`, `iter_documents`
- `tokenization.packing`: `with_eos`, `ConcatPacker`, `concat`, `bestfit`
- `tokenization.shards`: `shard_corpus`, `process_part`, `corpus_parts`, `ShardJob`, `shard_name`, `sample_key`
- `tokenization.verify`: `verify_shards`
- `tokenization.format`: the on-disk contract (samples, dtype, manifest)
- `tokenization.errors`: `TokenizationError`
"""
