"""`llm4msr refresh`: the nightly job as one command (build knowledge, retrain if needed, publish, reload).

The knowledge options are exactly those of `llm4msr knowledge build` (added by the same function, so the two never
drift apart), with --knowledge-root in place of --out. Exit codes: offline.refresh.job.ExitCode.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from offline.common import ConfigFlags
from offline.training.cli import add_levels_arg, levels_values
from offline.training.config import TrainConfig

if TYPE_CHECKING:
    from offline.refresh.job import RefreshConfig

# The training options of a first model: TrainConfig's flags, some prefixed with train- as they always were
# (--batch-size and --threads are knowledge build options too); --levels (default auto) comes from add_levels_arg.
TRAIN_FLAGS = ConfigFlags(
    TrainConfig,
    fields=("backbone", "placement", "user_knowledge", "epochs", "batch_size", "threads", "seed"),
    rename={"epochs": "train-epochs", "batch_size": "train-batch-size", "threads": "train-threads"},
)


def register(sub: argparse._SubParsersAction) -> None:
    from offline.knowledge.cli import add_build_args
    from offline.refresh.job import RETRAIN_MODES, ExitCode

    codes = "; ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)
    p = sub.add_parser(
        "refresh",
        help="nightly job: build knowledge incrementally, retrain if the knowledge space changed, publish",
        description="Builds knowledge incrementally (unchanged prompts keep their vectors), retrains the model when "
        "the knowledge space changed or no model exists, publishes the version to Redis, and writes a JSON run "
        f"report. Exit codes: {codes}.",
    )
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--knowledge-root", required=True, help="knowledge root (versions + LATEST), reused across runs")
    p.add_argument("--artifact-dir", required=True, help="model artifact the rankers serve (replaced on retrain)")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("LLM4MSR_REDIS_URL"),
        help="publish here (env LLM4MSR_REDIS_URL); without it rankers follow the root's LATEST",
    )
    p.add_argument("--keep-old", type=int, default=1, help="older published versions kept in Redis for rollback")
    p.add_argument("--report", help="write the run report (JSON) here")
    p.add_argument(
        "--retrain",
        choices=RETRAIN_MODES,
        default="auto",
        help="auto: when the knowledge space changed or no usable model exists",
    )
    p.add_argument(
        "--reload-url",
        action="append",
        default=[],
        help="ranker base URL to POST /admin/reload after a retrain (repeat; token: LLM4MSR_ADMIN_TOKEN)",
    )

    t = p.add_argument_group("training of a first model (later retrains reuse the current model's settings)")
    TRAIN_FLAGS.add_to(t)
    add_levels_arg(t)

    k = p.add_argument_group("knowledge build (the options of `llm4msr knowledge build`)")
    add_build_args(k, skip=frozenset({"data", "out"}))
    p.set_defaults(handler=cmd_refresh)


def config_from_args(args: argparse.Namespace) -> RefreshConfig:
    from offline.knowledge.cli import config_from_args as knowledge_config
    from offline.refresh.job import RefreshConfig

    kargs = argparse.Namespace(**vars(args))
    kargs.out = args.knowledge_root
    return RefreshConfig(
        knowledge=knowledge_config(kargs),
        artifact_dir=args.artifact_dir,
        redis_url=args.redis_url,
        keep_old=args.keep_old,
        retrain=args.retrain,
        train=TRAIN_FLAGS.build(args, progress=False, **levels_values(args)),
        reload_urls=tuple(args.reload_url),
        admin_token=_admin_token(),
    )


def _admin_token() -> str | None:
    """The rankers' admin token, as they take it: LLM4MSR_ADMIN_TOKEN or the file LLM4MSR_ADMIN_TOKEN_FILE names."""
    from shared.errors import UserFacingError

    token = os.environ.get("LLM4MSR_ADMIN_TOKEN") or None
    path = os.environ.get("LLM4MSR_ADMIN_TOKEN_FILE")
    if path and token is None:
        try:
            token = open(path, encoding="utf-8").read().strip() or None
        except OSError as exc:
            raise UserFacingError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    return token


def cmd_refresh(args: argparse.Namespace) -> int:
    from offline.refresh.job import run_refresh

    report = run_refresh(config_from_args(args))
    if args.report:
        report.write(args.report)
    print(report.summary())
    return report.exit_code
