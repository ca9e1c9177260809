"""`llm4msr train`, `llm4msr evaluate` and `llm4msr compare`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from offline.common import ConfigFlags, add_split_args, comma_list
from offline.training.config import TrainConfig
from shared.models.backbones import backbone_names

log = logging.getLogger(__name__)

# TrainConfig fields that compare sets per run (backbone, variant, seed), in --help order; --levels (which also
# takes "auto") is added by add_levels_arg.
RUN_FLAGS = ConfigFlags(TrainConfig, fields=("backbone", "llm4msr", "knowledge_source", "placement", "seed"))
AUTO_LEVELS = "auto"
# The training options that train and compare share (refresh takes some of them under its own names).
TRAINING_FLAGS = ConfigFlags(
    TrainConfig,
    fields=(
        "epochs",
        "patience",
        "checks_per_epoch",
        "norm_stats_batches",
        "batch_size",
        "lr",
        "knowledge_lr_scale",
        "weight_decay",
        "embed_dim",
        "embed_init_std",
        "auto_item_init_std",
        "reduce_dim",
        "proj_dim",
        "meta_dim",
        "rank",
        "hyper_hidden",
        "gate",
        "gate_decay",
        "knowledge_dropout",
        "user_knowledge",
        "early_rows",
        "calibrate",
        "threads",
        "progress",
    ),
)


def add_train_args(p: argparse.ArgumentParser) -> None:
    TRAINING_FLAGS.add_to(p.add_argument_group("training"))


def _levels(text: str) -> str | list[str]:
    """--levels: "auto" or a comma list (the level names are checked by the wrapper's config)."""
    return AUTO_LEVELS if text.strip() == AUTO_LEVELS else comma_list()(text)


def add_levels_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--levels",
        type=_levels,
        default=AUTO_LEVELS,
        help="knowledge levels: auto (default: fit the plain backbone, scenario,user and scenario,user,item with the "
        "same settings, scenario,user,item also with --auto-item-init-std, and keep the best on validation AUC) or "
        "a comma list of scenario,user,item (paper: scenario,user)",
    )


def levels_values(args: argparse.Namespace) -> dict:
    """The TrainConfig values of --levels (auto only matters with LLM4MSR on)."""
    if args.levels == AUTO_LEVELS:
        return {"levels_auto": bool(getattr(args, "llm4msr", True))}
    return {"levels": args.levels, "levels_auto": False}


def train_config_from_args(args: argparse.Namespace, flags: tuple[ConfigFlags, ...], **values: object) -> TrainConfig:
    """The TrainConfig of the given flags and values (the rest at their defaults); a progress bar only on a
    terminal."""
    values = {**{name: value for f in flags for name, value in f.values(args).items()}, **values}
    values["progress"] = values.get("progress", True) and sys.stderr.isatty()
    return TrainConfig.from_flat(values)


def _top_k(text: str) -> list[int]:
    """--top-k: distinct positive integers, sorted."""
    try:
        ks = sorted(set(comma_list(int)(text)))
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers such as 5,10,20, got {text!r}")
    return ks


def add_top_k_arg(p: argparse.ArgumentParser) -> None:
    from offline.training.metrics import DEFAULT_TOP_K

    p.add_argument(
        "--top-k",
        type=_top_k,
        default=list(DEFAULT_TOP_K),
        help="K of Recall@K, NDCG@K and MRR@K over each user's rows ranked by score (default %(default)s)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-scenario model (optionally with LLM4MSR) and write an artifact")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--knowledge", help="knowledge snapshot (version folder or root with LATEST)")
    RUN_FLAGS.add_to(p)
    add_levels_arg(p)
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_train_args(p)
    add_split_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "evaluate", help="AUC, Logloss, GAUC, Recall/NDCG/MRR@K of an artifact, overall and per scenario"
    )
    p.add_argument("artifact", help="artifact folder")
    p.add_argument("--data", required=True, help="dataset folder (split as recorded in the artifact)")
    p.add_argument(
        "--knowledge",
        help="knowledge snapshot (needed when the model reads LLM vectors; must be built on the evaluated split)",
    )
    p.add_argument("--split", choices=("valid", "test", "both"), default="both")
    p.add_argument("--json", action="store_true")
    add_top_k_arg(p)
    p.set_defaults(handler=cmd_evaluate)
    _register_compare(sub)


def _register_compare(sub: argparse._SubParsersAction) -> None:
    from offline.training.compare import ABLATION_VARIANTS, DEFAULT_VARIANTS, VARIANTS

    p = sub.add_parser("compare", help="train every backbone plain / +LLM4MSR / controls over seeds; write a report")
    p.add_argument("--data", required=True)
    p.add_argument("--knowledge", required=True)
    p.add_argument(
        "--knowledge-last",
        help="a second snapshot, built with --pooling last on the same split, for the *_last variants (mean vs last "
        "pooling)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=comma_list(int), help="explicit seeds, e.g. 3,4 (overrides --seeds)")
    p.add_argument("--backbones", type=comma_list(), default=backbone_names())
    p.add_argument(
        "--variants",
        type=comma_list(),
        default=None,
        help=f"subset of {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help=f"add where the gain comes from: {','.join(ABLATION_VARIANTS)} (the *_last ones need --knowledge-last)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="report folder; a finished run is reused on re-run when made with the same settings, else recomputed",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild the report from the finished runs made with these settings",
    )
    add_top_k_arg(p)
    add_train_args(p)
    add_split_args(p)
    p.set_defaults(handler=cmd_compare)


def format_metrics(metrics: dict) -> str:
    """The CTR table (with the expected calibration error), then (when computed) the top-K table: users ranked,
    then Recall@K, NDCG@K, MRR@K per K."""
    blocks = [
        (split, name, b)
        for split, m in metrics.items()
        for name, b in [("overall", m["overall"]), *m["per_scenario"].items()]
    ]
    lines = [f"{'split':<6} {'scenario':<20} {'AUC':>7} {'GAUC':>7} {'Logloss':>8} {'ECE':>7} {'rows':>9}"]
    for split, name, b in blocks:
        ece = b.get("ece", float("nan"))  # metrics stored before calibration was measured have none
        lines.append(
            f"{split:<6} {name:<20} {b['auc']:>7.4f} {b['gauc']:>7.4f} {b['logloss']:>8.4f} {ece:>7.4f} {b['rows']:>9d}"
        )
    ks = sorted(int(key.split("@")[1]) for key in (blocks[0][2] if blocks else {}) if key.startswith("ndcg@"))
    if ks:
        cols = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in ks]
        heads = [f"{m}@{k}" for m in ("R", "NDCG", "MRR") for k in ks]
        lines += ["", f"{'split':<6} {'scenario':<20} {'users':>7} " + " ".join(f"{h:>8}" for h in heads)]
        for split, name, b in blocks:
            lines.append(f"{split:<6} {name:<20} {b['topk_users']:>7d} " + " ".join(f"{b[c]:>8.4f}" for c in cols))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from offline.common import load_split, split_config_from_args
    from offline.training.trainer import train
    from shared.artifact import save_artifact
    from shared.knowledge.snapshot import KnowledgeSnapshot

    # bad flags fail before any data is read
    config = train_config_from_args(args, (RUN_FLAGS, TRAINING_FLAGS), **levels_values(args))
    dataset, split = load_split(args.data, split_config_from_args(args))
    snapshot = KnowledgeSnapshot(args.knowledge) if args.knowledge else None
    result = train(dataset, split, snapshot, config)
    out = save_artifact(args.out, result.model, result.encoder, result.artifact_fields(split), args.overwrite)
    if args.json:
        print(json.dumps(result.metrics, indent=2))
    else:
        if result.level_selection is not None:
            print(result.level_selection.summary())
        print(format_metrics(result.metrics))
        print(f"trained in {result.seconds:.1f}s (best epoch {result.best_epoch}); artifact written to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from offline.common import load_split
    from offline.data.split import SplitConfig
    from offline.training.leakage import check_snapshot_split
    from offline.training.metrics import summarize
    from shared.artifact import check_knowledge_space, load_artifact
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestScorer, SnapshotLookup

    artifact = load_artifact(args.artifact)
    scorer = RequestScorer(artifact)
    _, split = load_split(args.data, SplitConfig(**artifact.config.split_config))
    if split.dataset_fingerprint != artifact.config.data_fingerprint:
        log.warning("the data differs from the data the model was trained on (fingerprint mismatch)")
    import torch

    trained_with = artifact.config.train.get("torch_version")
    if trained_with and trained_with != torch.__version__:
        log.warning(
            "trained with torch %s, evaluating with %s: metrics may differ from the stored ones in the last digits",
            trained_with,
            torch.__version__,
        )
    lookup = None
    if args.knowledge:
        snapshot = KnowledgeSnapshot(args.knowledge)
        check_knowledge_space(artifact.config, snapshot.space.id, f"snapshot {snapshot.path}")
        if scorer.needs_levels:  # the leakage guard of train: vectors must come from this split's train rows
            check_snapshot_split(snapshot, split)
        lookup = SnapshotLookup(snapshot)
    names = ("valid", "test") if args.split == "both" else (args.split,)
    frames = split.frames()
    metrics = {name: summarize(frames[name], scorer.score_rows(frames[name], lookup), args.top_k) for name in names}
    if args.json:
        print(json.dumps({"model_version": artifact.config.model_version, "metrics": metrics}, indent=2))
    else:
        print(f"model {artifact.config.model_version}")
        print(format_metrics(metrics))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from offline.common import split_config_from_args
    from offline.training.compare import CompareConfig, run_compare, select_variants

    config = CompareConfig(
        data=args.data,
        knowledge=args.knowledge,
        knowledge_last=args.knowledge_last,
        out=args.out,
        train=train_config_from_args(args, (TRAINING_FLAGS,)),
        split=split_config_from_args(args),
        seeds=tuple(args.seed_list) if args.seed_list else tuple(range(args.seeds)),
        backbones=tuple(args.backbones),
        variants=select_variants(args.variants, args.ablations, args.knowledge_last),
        top_k=tuple(args.top_k),
        report_only=args.report_only,
    )
    run_compare(config)
    return 0
