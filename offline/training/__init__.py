"""Training, evaluation and comparison of multi-scenario CTR models with and without LLM4MSR."""
