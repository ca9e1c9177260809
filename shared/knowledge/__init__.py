"""Knowledge embeddings: the snapshot format on disk and the Redis key layout."""
