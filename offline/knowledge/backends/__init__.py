"""LLM backends of the knowledge job behind one interface (see base.py): `hf` (transformers) and `vllm`."""

from __future__ import annotations

from offline.knowledge.backends.base import Backend, BackendConfig


def make_backend(config: BackendConfig) -> Backend:
    """Instantiates the configured backend (heavy imports happen here, not at CLI parse time)."""
    if config.backend == "hf":
        from offline.knowledge.backends.hf import HFBackend

        return HFBackend(config)
    if config.backend == "vllm":
        from offline.knowledge.backends.vllm_backend import VLLMBackend

        return VLLMBackend(config)
    from shared.errors import UserFacingError

    raise UserFacingError(f"unknown backend {config.backend!r}; expected hf or vllm")


__all__ = ["Backend", "BackendConfig", "make_backend"]
