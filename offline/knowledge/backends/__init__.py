"""LLM backends of the knowledge job behind one interface (see base.py), chosen by name from BACKENDS.

A new backend is a Backend subclass taking its config (BackendConfig or a subclass of it), registered here or from
any module imported before the CLI builds its parser: `BACKENDS.register("name", Config, Class)`
(docs/architecture.md, Where to extend).
"""

from __future__ import annotations

from collections.abc import Callable

from offline.knowledge.backends.base import Backend, BackendConfig
from offline.knowledge.registry import Registry

# name -> (config class, Backend class taking that config); implementations are imported when a backend is made.
BACKENDS: Registry[Callable[[BackendConfig], Backend]] = Registry("backend")
BACKENDS.register("hf", BackendConfig, "offline.knowledge.backends.hf:HFBackend")
BACKENDS.register("vllm", BackendConfig, "offline.knowledge.backends.vllm_backend:VLLMBackend")


def make_backend(config: BackendConfig) -> Backend:
    """Instantiates the configured backend (heavy imports happen here, not at CLI parse time)."""
    return BACKENDS.get(config.backend).load()(config)


__all__ = ["BACKENDS", "Backend", "BackendConfig", "make_backend"]
