"""`llm4msr knowledge build|publish|show`."""

from __future__ import annotations

import argparse
import dataclasses
import os

from offline.common import add_split_args, split_config_from_args
from offline.knowledge.backends import BACKENDS, BackendConfig
from offline.knowledge.build_config import KnowledgeConfig
from offline.knowledge.executors import EXECUTORS
from offline.knowledge.options import add_dataclass_args, dataclass_from_args
from offline.knowledge.prompts import PromptConfig
from shared.knowledge.vector_codec import DEFAULT_FORMAT, FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("knowledge", help="build, publish and inspect LLM knowledge snapshots")
    ksub = parser.add_subparsers(dest="knowledge_command", required=True, metavar="ACTION")

    b = ksub.add_parser("build", help="build (or resume, or incrementally refresh) a knowledge snapshot")
    add_build_args(b)
    b.set_defaults(handler=_build)

    p = ksub.add_parser("publish", help="copy a snapshot to Redis and flip llm4msr:kn:current to it")
    p.add_argument("snapshot", help="version folder or knowledge root (its LATEST)")
    p.add_argument("--redis-url", default=os.environ.get("LLM4MSR_REDIS_URL"), help="env LLM4MSR_REDIS_URL")
    p.add_argument("--keep-old", type=int, default=1, help="older versions kept for rollback")
    p.add_argument(
        "--vector-format",
        choices=FORMATS,
        default=DEFAULT_FORMAT,
        help="how vectors are stored: int8 (a per-vector scale after per-dimension standardization, about 3.5x "
        "smaller than float32), float16 or float32 (deploy/redis-cluster.md)",
    )
    p.set_defaults(handler=_publish)

    s = ksub.add_parser("show", help="print a user's (or scenario's/item's) prompt, answer and vector norm")
    s.add_argument("snapshot")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--user")
    g.add_argument("--scenario")
    g.add_argument("--item")
    s.add_argument("--fit", action="store_true", help="with --user: the training-only fit prompt and its vector")
    s.set_defaults(handler=_show)


def add_build_args(b, skip: frozenset[str] = frozenset()) -> None:
    """The options of `knowledge build` on a parser or argument group; `refresh` takes them with skip={"data", "out"}.

    skip names option destinations to leave out. The options are generated from the config dataclasses
    (KnowledgeConfig, BackendConfig, PromptConfig, each executor's settings) and the choices of --backend and
    --engine from their registries; the calls below only fix the order of --help.
    """
    b = _Skipping(b, skip)
    backend_choices = {"backend": BACKENDS.names()}
    add_dataclass_args(b, KnowledgeConfig, only=("data", "out"))
    add_dataclass_args(b, BackendConfig, only=("backend", "model"), choices=backend_choices)
    add_dataclass_args(b, KnowledgeConfig, only=("mode", "pooling", "engine"))
    for engine in EXECUTORS.entries():
        add_dataclass_args(b, engine.config_class, prefix=engine.name)
    add_dataclass_args(b, BackendConfig, exclude=("backend", "model"))
    for backend_config in _backend_config_subclasses():
        add_dataclass_args(b, backend_config, exclude={f.name for f in dataclasses.fields(BackendConfig)})
    add_dataclass_args(b, PromptConfig)
    add_dataclass_args(
        b, KnowledgeConfig, only=("fit_share", "reduce_dim", "new_space", "incremental", "shard_size", "progress")
    )
    add_split_args(b)


def _backend_config_subclasses() -> list[type]:
    """Config classes of registered backends that extend BackendConfig: their own fields become options too."""
    classes = [e.config_class for e in BACKENDS.entries() if e.config_class is not BackendConfig]
    return list(dict.fromkeys(classes))


class _Skipping:
    """add_argument on the wrapped parser/group, except for the destinations in skip."""

    def __init__(self, target, skip: frozenset[str]):
        self.target, self.skip = target, skip

    def add_argument(self, *flags: str, **kwargs) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if dest not in self.skip:
            self.target.add_argument(*flags, **kwargs)

    def add_argument_group(self, *args, **kwargs) -> _Skipping:
        """A group of its own on a parser; inside a group, the same group (argparse does not nest them)."""
        if isinstance(self.target, argparse.ArgumentParser):
            return _Skipping(self.target.add_argument_group(*args, **kwargs), self.skip)
        return self


def config_from_args(args: argparse.Namespace) -> KnowledgeConfig:
    """The build's config from parsed `knowledge build` (or `refresh`) options: each config dataclass is filled from
    the options generated from its fields (the chosen engine's settings from its --<engine>-* options)."""
    return dataclass_from_args(
        KnowledgeConfig,
        args,
        backend=backend_config_from_args(args),
        engine_options=dataclass_from_args(EXECUTORS.get(args.engine).config_class, args, prefix=args.engine),
        split=split_config_from_args(args),
        prompts=dataclass_from_args(PromptConfig, args),
    )


def backend_config_from_args(args: argparse.Namespace, **given) -> BackendConfig:
    """The config class of the chosen backend (args.backend, or given["backend"]) filled from the options a parser
    carries; the others keep their defaults. The knowledge CLI and bench/knowledge_bench.py both read it here."""
    name = given.get("backend") or getattr(args, "backend", None) or BackendConfig.backend
    return dataclass_from_args(BACKENDS.get(name).config_class, args, **given)


def _build(args: argparse.Namespace) -> int:
    from offline.knowledge.build import run_build

    result = run_build(config_from_args(args))
    print(result.summary())
    return 0


def _publish(args: argparse.Namespace) -> int:
    from offline.knowledge.publish import publish_snapshot
    from shared.errors import UserFacingError
    from shared.redact import redact_url

    if not args.redis_url:
        raise UserFacingError("--redis-url (or LLM4MSR_REDIS_URL) is required to publish")
    version = publish_snapshot(args.snapshot, args.redis_url, keep_old=args.keep_old, vector_format=args.vector_format)
    print(f"published knowledge {version} to {redact_url(args.redis_url)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from offline.knowledge.show import show
    from shared.errors import UserFacingError
    from shared.knowledge.snapshot import USER_FIT

    table, id_ = (
        ("user", args.user) if args.user else ("scenario", args.scenario) if args.scenario else ("item", args.item)
    )
    if args.fit:
        if table != "user":
            raise UserFacingError("--fit shows a user's fit prompt: use it with --user")
        table = USER_FIT
    print(show(args.snapshot, table, id_))
    return 0
