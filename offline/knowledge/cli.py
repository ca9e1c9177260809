"""`llm4msr knowledge build|publish|show`."""

from __future__ import annotations

import argparse
import os

from offline.common import add_split_args, split_config_from_args


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
    p.set_defaults(handler=_publish)

    s = ksub.add_parser("show", help="print a user's (or scenario's/item's) prompt, answer and vector norm")
    s.add_argument("snapshot")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--user")
    g.add_argument("--scenario")
    g.add_argument("--item")
    s.set_defaults(handler=_show)


def add_build_args(b, skip: frozenset[str] = frozenset()) -> None:
    """The options of `knowledge build` on a parser or argument group; `refresh` takes them with skip={"data", "out"}.

    skip names option destinations to leave out.
    """
    b = _Skipping(b, skip)
    b.add_argument("--data", required=True, help="dataset folder")
    b.add_argument("--out", required=True, help="knowledge root: versions are written under it, LATEST points")
    b.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    b.add_argument("--model", default=None, help="local Hugging Face model folder (default: embedded SmolLM2)")
    b.add_argument("--mode", choices=["generate", "encode"], default="encode")
    b.add_argument("--pooling", choices=["mean", "last"], default="mean")
    b.add_argument("--engine", choices=["local", "ray"], default="local")
    b.add_argument("--ray-workers", type=int, default=2, help="Ray actors, each with its own LLM engine")
    b.add_argument("--ray-address", default=None, help="existing Ray cluster (default: a local Ray)")
    b.add_argument("--ray-gpus-per-worker", type=float, default=0.0)
    b.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32", "float16"],
        default="auto",
        help="auto: bfloat16 where the CPU (AMX-BF16/AVX512-BF16) or GPU computes it natively, "
        "else float32 (CPU) / float16 (GPU)",
    )
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (vllm: cpu or any GPU device)")
    b.add_argument("--batch-size", type=int, default=16, help="texts per batch when --batch-tokens is 0")
    b.add_argument(
        "--batch-tokens",
        type=int,
        default=8192,
        help="hf: most padded tokens per batch (texts x longest, + --max-new-tokens when generating; padding kept "
        "under 10%%): short texts go in large batches, long prompts in small ones; 0 = fixed batches of --batch-size",
    )
    b.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="hf: run every prompt in full instead of reusing the KV cache of the prefix the prompts share",
    )
    b.add_argument("--max-new-tokens", type=int, default=96)
    b.add_argument(
        "--threads", type=int, default=0, help="torch/CPU threads (0 = OMP_NUM_THREADS, else the usable cores)"
    )
    b.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="longest text fed to the LLM, in tokens; longer ones are cut (counted, warned about); part of the "
        "knowledge space",
    )
    b.add_argument("--no-chat-template", action="store_true", help="prompt the model without its chat template")
    b.add_argument("--vllm-python", default=None, help="python of the vllm environment (env LLM4MSR_VLLM_PYTHON)")
    b.add_argument(
        "--vllm-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vllm: run eagerly (default: eager on CPU; CUDA graphs and torch.compile on a GPU)",
    )
    b.add_argument("--max-items-per-scenario", type=int, default=20)
    b.add_argument("--history-token-budget", type=int, default=256)
    b.add_argument("--reduce-dim", type=int, default=None, help="PCA to this dimension (defines the space)")
    b.add_argument("--new-space", action="store_true", help="fit a new reducer even if the last version has one")
    b.add_argument("--full", action="store_true", help="recompute every vector (no incremental reuse)")
    b.add_argument("--shard-size", type=int, default=256, help="rows per resumable shard")
    b.add_argument("--no-progress", action="store_true")
    add_split_args(b)


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


def config_from_args(args: argparse.Namespace):
    from offline.knowledge.backends.base import BackendConfig
    from offline.knowledge.build import KnowledgeConfig
    from offline.knowledge.prompts import PromptConfig

    backend = BackendConfig(
        backend=args.backend,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        prefix_reuse=not args.no_prefix_reuse,
        chat_template=not args.no_chat_template,
        vllm_python=args.vllm_python,
        vllm_eager=args.vllm_eager,
    )
    return KnowledgeConfig(
        data=args.data,
        out=args.out,
        backend=backend,
        mode=args.mode,
        pooling=args.pooling,
        engine=args.engine,
        ray_workers=args.ray_workers,
        ray_address=args.ray_address,
        ray_gpus_per_worker=args.ray_gpus_per_worker,
        split=split_config_from_args(args),
        prompts=PromptConfig(
            max_items_per_scenario=args.max_items_per_scenario, history_token_budget=args.history_token_budget
        ),
        reduce_dim=args.reduce_dim,
        new_space=args.new_space,
        incremental=not args.full,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )


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
    version = publish_snapshot(args.snapshot, args.redis_url, keep_old=args.keep_old)
    print(f"published knowledge {version} to {redact_url(args.redis_url)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from offline.knowledge.show import show

    level, id_ = (
        ("user", args.user) if args.user else ("scenario", args.scenario) if args.scenario else ("item", args.item)
    )
    print(show(args.snapshot, level, id_))
    return 0
