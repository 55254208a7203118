"""Reading token shards (and sidecar shards such as the teacher cache) as one deterministic,
resumable stream of micro-batches per data-parallel rank. See dataset.py for the design."""
from pipeline.data.dataset import Source, TokenShardDataset
from pipeline.data.loader import ResumableLoader
from pipeline.data.order import BlendTable, SourceOrder, StepLayout
from pipeline.data.shards import ShardReader, verify_shard
from pipeline.data.sources import SOURCE_SHARDS, ShardSet, load_manifest, sidecar_shards

__all__ = ["SOURCE_SHARDS", "BlendTable", "ResumableLoader", "ShardReader", "ShardSet", "Source", "SourceOrder",
           "StepLayout", "TokenShardDataset", "load_manifest", "sidecar_shards", "verify_shard"]
