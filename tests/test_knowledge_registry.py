"""The extension points of the knowledge stage are registries that drive the CLI: a backend or an executor
registered from outside the package gets its `--backend`/`--engine` choice and its options in a freshly built
parser and runs a real build through `llm4msr knowledge build`; unknown names fail with one line; and the modules
of offline/knowledge import each other without a cycle."""

from __future__ import annotations

import argparse
import ast
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures_llm import tiny_model  # noqa: F401  (fixture)

from llm4msr_cli import build_parser
from llm4msr_cli import main as cli_main
from offline.knowledge.backends import BACKENDS, make_backend
from offline.knowledge.backends.base import Backend, BackendConfig, Progress
from offline.knowledge.build import KnowledgeConfig
from offline.knowledge.cli import config_from_args
from offline.knowledge.executor import ExecutorConfig, ShardResult
from offline.knowledge.executors import EXECUTORS
from offline.knowledge.local_executor import LocalConfig, LocalExecutor
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EchoConfig(BackendConfig):
    """A backend with a setting of its own: it becomes the option --echo-scale."""

    echo_scale: float = 1.0


class EchoBackend(Backend):
    """Deterministic stand-in for an LLM: answers with the prompt's length, embeds a hash of the text."""

    def __init__(self, config: EchoConfig):
        import json

        from offline.knowledge.models import resolve_model

        self.config = config
        path, self.model_name = resolve_model(config.model)
        self.hidden_size = json.loads((path / "config.json").read_text())["hidden_size"]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def generate(self, prompts: Sequence[str], progress: Progress | None = None) -> list[str]:
        return [f"echo {len(p)}" for p in prompts]

    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray:
        return np.stack([echo_vector(t, self.hidden_size) * self.config.echo_scale for t in texts])


def echo_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@dataclass(frozen=True)
class ReorderingConfig(ExecutorConfig):
    """An executor setting: it becomes the option --reordering-reverse."""

    reverse: bool = False


class ReorderingExecutor(LocalExecutor):
    """With reverse, runs the shards last to first: the build must place results by shard index, not by arrival."""

    def __init__(self, backend_config: BackendConfig, options: ReorderingConfig):
        super().__init__(backend_config)
        self.options = options

    def map(
        self, op: str, shards: list[list[str]], pooling: str, progress: Progress | None = None
    ) -> Iterator[tuple[int, ShardResult]]:
        order = range(len(shards))
        for k in reversed(order) if self.options.reverse else order:
            for _, result in super().map(op, [shards[k]], pooling, progress):
                yield k, result


@pytest.fixture
def registered() -> Iterator[None]:
    """The toy backend and executor registered for one test (as a plugin module would register them)."""
    BACKENDS.register("echo", EchoConfig, EchoBackend)
    EXECUTORS.register("reordering", ReorderingConfig, ReorderingExecutor)
    try:
        yield
    finally:
        BACKENDS.unregister("echo")
        EXECUTORS.unregister("reordering")


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _choices(parser: argparse.ArgumentParser, flag: str) -> list[str]:
    return list(next(a for a in parser._actions if flag in a.option_strings).choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {f for a in parser._actions for f in a.option_strings}


@pytest.mark.parametrize("command", [("knowledge", "build"), ("refresh",)])
def test_cli_choices_are_the_registry_keys(command):
    parser = _subparser(build_parser(), *command)
    assert _choices(parser, "--backend") == list(BACKENDS.names()) == ["hf", "vllm"]
    assert _choices(parser, "--engine") == list(EXECUTORS.names()) == ["local", "ray"]


@pytest.mark.parametrize("command", [("knowledge", "build"), ("refresh",)])
def test_registered_backend_and_executor_appear_in_a_fresh_parser(registered, command):
    parser = _subparser(build_parser(), *command)
    assert _choices(parser, "--backend") == ["hf", "vllm", "echo"]
    assert _choices(parser, "--engine") == ["local", "ray", "reordering"]
    assert {"--echo-scale", "--reordering-reverse", "--ray-workers"} <= _flags(parser)


def test_config_from_args_fills_the_registered_config_classes(registered):
    argv = ["knowledge", "build", "--data", "d", "--out", "o", "--backend", "echo", "--echo-scale", "2.5"]
    argv += ["--engine", "reordering", "--reordering-reverse", "--no-prefix-reuse", "--max-length", "64"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.backend == EchoConfig(backend="echo", echo_scale=2.5, prefix_reuse=False, max_length=64)
    assert config.engine == "reordering" and config.engine_options == ReorderingConfig(reverse=True)

    config = config_from_args(build_parser().parse_args(["knowledge", "build", "--data", "d", "--out", "o"]))
    assert type(config.backend) is BackendConfig and config.backend == BackendConfig()
    assert config.engine_options == LocalConfig()
    ray = config_from_args(
        build_parser().parse_args(["knowledge", "build", "--data", "d", "--out", "o", "--engine", "ray"])
    )
    assert ray.engine_options == EXECUTORS.get("ray").config_class()


def test_registered_backend_and_executor_run_a_build_through_the_cli(
    registered,
    synth_dir,
    tiny_model,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "kn"
    argv = ["knowledge", "build", "--data", str(synth_dir), "--out", str(out), "--model", str(tiny_model)]
    argv += ["--backend", "echo", "--echo-scale", "2", "--engine", "reordering", "--reordering-reverse"]
    assert cli_main([*argv, "--mode", "generate", "--shard-size", "16", "--dtype", "float32", "--no-progress"]) == 0
    snap = KnowledgeSnapshot(out)
    assert snap.manifest.backend == "echo" and snap.manifest.extra["engine"] == "reordering"
    assert snap.manifest.extra["backend_config"]["echo_scale"] == 2.0
    users = snap.users()
    assert len(users.ids) > 16  # more than one shard, run in reverse order
    from offline.knowledge.show import read_prompt

    for j, user in enumerate(users.ids):
        prompt = read_prompt(snap.path, "user", user)
        assert users.responses[j] == f"echo {len(prompt)}"
        expected = 2 * echo_vector(prompt + " " + users.responses[j], snap.space.raw_dim)
        assert np.array_equal(users.embeddings[j], expected), user


def test_unknown_names_fail_with_one_line(capsys):
    for make in (
        lambda: make_backend(BackendConfig(backend="nope")),
        lambda: KnowledgeConfig(data="d", out="o", engine="nope"),
    ):
        with pytest.raises(UserFacingError) as err:
            make()
        message = str(err.value)
        assert "\n" not in message and "'nope'" in message, message
    assert str(err.value) == "unknown engine 'nope'; expected one of local, ray"
    with pytest.raises(UserFacingError, match=r"^unknown backend 'nope'; expected one of hf, vllm$"):
        make_backend(BackendConfig(backend="nope"))
    with pytest.raises(UserFacingError, match=r"^engine 'ray' takes RayConfig options, not LocalConfig$"):
        KnowledgeConfig(data="d", out="o", engine="ray", engine_options=LocalConfig())

    with pytest.raises(SystemExit) as exit_:
        cli_main(["knowledge", "build", "--data", "d", "--out", "o", "--backend", "nope"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--backend: invalid choice: 'nope'" in last and "hf" in last and "vllm" in last, last


def test_no_import_cycle_in_offline_knowledge():
    """Function-level imports count: a lazy import back into a module that imports you is still a cycle."""
    package = REPO / "offline" / "knowledge"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted(name for name in graph if reaches(name, name))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert len(graph) > 20 and "offline.knowledge.ray_engine" in graph["offline.knowledge.executors"]
