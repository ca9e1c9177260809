"""`--engine local`: every shard through one backend in this process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from offline.knowledge.backends import make_backend
from offline.knowledge.backends.base import Backend, BackendConfig, Progress
from offline.knowledge.executor import Executor, ExecutorConfig, ShardResult


@dataclass(frozen=True)
class LocalConfig(ExecutorConfig):
    """The local engine has no settings of its own."""


class LocalExecutor(Executor):
    def __init__(
        self, backend_config: BackendConfig, options: LocalConfig | None = None, backend: Backend | None = None
    ):
        """backend: an engine already started (the bench times the build's path on one model); else one is made."""
        self.backend = backend if backend is not None else make_backend(backend_config)

    def map(
        self, op: str, shards: list[list[str]], pooling: str, progress: Progress | None = None
    ) -> Iterator[tuple[int, ShardResult]]:
        """Shards in order; progress is called per batch by the backend."""
        for k, texts in enumerate(shards):
            if op == "generate":
                yield k, self.backend.generate(texts, progress=progress)
            else:
                yield k, self.backend.embed(texts, pooling, progress=progress)

    def end_generation(self) -> None:
        self.backend.end_generation()

    def close(self) -> None:
        self.backend.close()
