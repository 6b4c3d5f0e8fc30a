"""The score stage: direction vectors, per-shard scoring workers, the Ray driver, the merge."""
