"""Code used by both the offline jobs and the online ranker: data contract, models, knowledge store, artifact."""
