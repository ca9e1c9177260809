"""The knowledge-refresh job: prompts, LLM backends, snapshots and Redis publishing."""
