"""Tokenizer training, text readers, packing and token shard writing."""
