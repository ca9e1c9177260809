"""The build executors by name (`llm4msr knowledge build --engine`): name -> (settings class, Executor class).

A new executor is an Executor subclass (offline/knowledge/executor.py) and an ExecutorConfig subclass, registered
with `EXECUTORS.register("name", Config, Class)`; its settings become `--name-<field>` options
(docs/architecture.md, Where to extend).
"""

from __future__ import annotations

from collections.abc import Callable

from offline.knowledge.backends.base import BackendConfig
from offline.knowledge.executor import Executor, ExecutorConfig
from offline.knowledge.local_executor import LocalConfig, LocalExecutor
from offline.knowledge.ray_engine import RayConfig, RayExecutor
from offline.knowledge.registry import Registry

ExecutorFactory = Callable[[BackendConfig, ExecutorConfig], Executor]

EXECUTORS: Registry[ExecutorFactory] = Registry("engine")
# Both modules are light: Ray is imported when a RayExecutor starts.
EXECUTORS.register("local", LocalConfig, LocalExecutor)
EXECUTORS.register("ray", RayConfig, RayExecutor)


def make_executor(engine: str, backend_config: BackendConfig, options: ExecutorConfig) -> Executor:
    """Starts the named executor (its backends load here, not when the build is planned)."""
    return EXECUTORS.get(engine).load()(backend_config, options)
