"""The build executor interface: where the LLM work of a knowledge build runs (in process, over Ray actors ...).

The build hands an executor shards of texts and writes each result as its resumable shard file; the executor only
decides where the backend calls run. Implementations are registered by name in offline/knowledge/executors.py
(docs/architecture.md, Where to extend).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from offline.knowledge.backends.base import Progress

# What an executor yields per shard: answers (generate) or raw pooled vectors [texts, hidden size] (embed).
ShardResult = list[str] | np.ndarray


@dataclass(frozen=True)
class ExecutorConfig:
    """Base of an executor's own settings; each field is a `--<engine>-<field>` option of `knowledge build`."""


class Executor(ABC):
    """Runs backend calls over shards of texts.

    An implementation is constructed as `cls(backend_config, options)`, options being an instance of the config
    class it is registered with; it starts its backend(s) from backend_config.
    """

    @abstractmethod
    def map(
        self, op: str, shards: list[list[str]], pooling: str, progress: Progress | None = None
    ) -> Iterator[tuple[int, ShardResult]]:
        """Yields (shard index, result) as shards finish, in any order; op is "generate" or "embed".

        progress(n) is called as texts finish (drives the progress bar).
        """

    @abstractmethod
    def end_generation(self) -> None:
        """No generate call follows (lets vllm free the generating engine before embedding)."""

    @abstractmethod
    def close(self) -> None:
        """Releases every backend and worker."""
