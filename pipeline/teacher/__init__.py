"""The offline teacher cache: sparse targets from vocab-parallel teacher logits, their codec, the job that
writes cache shards next to token shards, its verification, and the student-side reader."""
