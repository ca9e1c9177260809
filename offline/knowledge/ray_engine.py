"""`--engine ray`: shards of prompts spread over Ray actors, each holding its own LLM backend.

On a GPU cluster: start Ray on every node (`ray start --head` / `ray start --address=HEAD:6379`), then run
`llm4msr knowledge build ... --backend vllm --engine ray --ray-address auto --ray-workers <GPUs>
--ray-gpus-per-worker 1`: one vLLM engine per GPU. The driver keeps the resumable shard files and the snapshot, so
only the driver needs the output folder; the workers need the model folder at the same path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from offline.knowledge.backends.base import BackendConfig, Progress
from offline.knowledge.executor import Executor, ExecutorConfig, ShardResult
from offline.knowledge.options import cli

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RayConfig(ExecutorConfig):
    """Where the Ray actors run (the CLI's --ray-* options)."""

    workers: int = field(default=2, metadata=cli(help="Ray actors, each with its own LLM engine"))
    address: str | None = field(default=None, metadata=cli(help="existing Ray cluster (default: a local Ray)"))
    cpus_per_worker: float = field(default=1.0, metadata=cli(hidden=True))
    gpus_per_worker: float = 0.0


class _Worker:
    """A Ray actor: one backend, kept for the whole build (model loading is the expensive part)."""

    def __init__(self, backend_config: BackendConfig):
        from offline.knowledge.backends import make_backend

        self.backend = make_backend(backend_config)

    def run(self, op: str, texts: list[str], pooling: str) -> ShardResult:
        if op == "generate":
            return self.backend.generate(texts)
        return self.backend.embed(texts, pooling)

    def end_generation(self) -> None:
        self.backend.end_generation()

    def close(self) -> None:
        self.backend.close()


class RayExecutor(Executor):
    def __init__(self, backend_config: BackendConfig, options: RayConfig | None = None):
        import ray

        options = options if options is not None else RayConfig()
        self._own_ray = False
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
            if options.address:
                kwargs["address"] = options.address
            else:
                kwargs["num_cpus"] = max(1, int(options.workers * options.cpus_per_worker))
            # Workers import this project: make it importable even when it is not installed there.
            pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
            ray.init(**kwargs)
            self._own_ray = True
        actor = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(_Worker)
        self.actors = [actor.remote(backend_config) for _ in range(max(1, options.workers))]
        log.info("ray engine: %d workers", len(self.actors))

    def map(
        self, op: str, shards: list[list[str]], pooling: str, progress: Progress | None = None
    ) -> Iterator[tuple[int, ShardResult]]:
        """Keeps every actor busy with one shard at a time; yields shards as they finish (progress per shard)."""
        import ray

        pending: dict = {}
        queue = list(enumerate(shards))
        free = list(self.actors)

        def submit() -> None:
            while free and queue:
                a = free.pop()
                k, texts = queue.pop(0)
                pending[a.run.remote(op, texts, pooling)] = (k, a)

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k, a = pending.pop(done[0])
            result = ray.get(done[0])
            free.append(a)
            submit()
            if progress is not None:
                progress(len(shards[k]))
            yield k, result

    def end_generation(self) -> None:
        import ray

        ray.get([a.end_generation.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        try:
            ray.get([a.close.remote() for a in self.actors])
            for a in self.actors:
                ray.kill(a)
        finally:
            if self._own_ray:
                ray.shutdown()
