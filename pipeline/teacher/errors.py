"""The one error the teacher-cache code raises for bad input: a cache, a record or a job it cannot use."""
from __future__ import annotations


class CacheError(ValueError):
    """A cache folder, shard, record or job setting that is not what the cache format or job expects; the
    message names the file, key or field and what was expected."""
