"""Multi-scenario CTR models: backbones (registry), the LLM4MSR wrapper and feature encoding."""
