"""`llm4msr train`, `llm4msr evaluate` and `llm4msr compare`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from offline.common import add_split_args

log = logging.getLogger(__name__)

BACKBONE_NAMES = ("shared_bottom", "mmoe", "ple", "star")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="maximum epochs (early stopping on validation AUC)")
    g.add_argument("--patience", type=int, default=1, help="epochs without validation AUC gain before stopping")
    g.add_argument("--batch-size", type=int, default=2048)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--embed-dim", type=int, default=16)
    g.add_argument("--reduce-dim", type=int, default=64, help="LLM4MSR: frozen PCA size of the LLM vectors")
    g.add_argument("--proj-dim", type=int, default=32, help="LLM4MSR: projected knowledge size")
    g.add_argument("--meta-dim", type=int, default=32, help="LLM4MSR: meta layer width")
    g.add_argument("--rank", type=int, default=8, help="LLM4MSR: rank of the generated weights")
    g.add_argument("--hyper-hidden", type=int, default=32, help="LLM4MSR: hypernetwork hidden size")
    g.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; the same seed and thread count give a byte-identical model (recorded in the artifact)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _levels(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _top_k(text: str) -> list[int]:
    """--top-k: distinct positive integers, sorted."""
    try:
        ks = sorted({int(t) for t in _levels(text)})
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
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default="star")
    p.add_argument("--no-llm4msr", action="store_true", help="the plain backbone, no meta networks")
    p.add_argument(
        "--knowledge-source",
        choices=("llm", "id", "random"),
        default="llm",
        help="llm = snapshot vectors; id / random = the controls (learnable ids / fixed random vectors)",
    )
    p.add_argument(
        "--levels",
        type=_levels,
        default=["scenario", "user"],
        help="comma list of scenario,user,item (paper: scenario,user)",
    )
    p.add_argument("--placement", choices=("bottom", "parallel", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser("compare", help="train every backbone plain / +LLM4MSR / controls over seeds; write a report")
    p.add_argument("--data", required=True)
    p.add_argument("--knowledge", required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=_levels, help="explicit seeds, e.g. 3,4 (overrides --seeds)")
    p.add_argument("--backbones", type=_levels, default=list(BACKBONE_NAMES))
    p.add_argument(
        "--variants",
        type=_levels,
        default=None,
        help="subset of plain,llm_su,llm_sui,id_sui,random_sui (also id_su, random_su)",
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


def _train_config(args: argparse.Namespace, **overrides):
    from offline.training.trainer import TrainConfig

    cfg = TrainConfig(
        backbone=getattr(args, "backbone", "star"),
        llm4msr=not getattr(args, "no_llm4msr", False),
        knowledge_source=getattr(args, "knowledge_source", "llm"),
        levels=getattr(args, "levels", ["scenario", "user"]),
        placement=getattr(args, "placement", "both"),
        embed_dim=args.embed_dim,
        reduce_dim=args.reduce_dim,
        proj_dim=args.proj_dim,
        meta_dim=args.meta_dim,
        rank=args.rank,
        hyper_hidden=args.hyper_hidden,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=getattr(args, "seed", 0),
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def format_metrics(metrics: dict) -> str:
    """The CTR table, then (when computed) the top-K table: users ranked, then Recall@K, NDCG@K, MRR@K per K."""
    blocks = [
        (split, name, b)
        for split, m in metrics.items()
        for name, b in [("overall", m["overall"]), *m["per_scenario"].items()]
    ]
    lines = [f"{'split':<6} {'scenario':<20} {'AUC':>7} {'GAUC':>7} {'Logloss':>8} {'rows':>9}"]
    for split, name, b in blocks:
        lines.append(f"{split:<6} {name:<20} {b['auc']:>7.4f} {b['gauc']:>7.4f} {b['logloss']:>8.4f} {b['rows']:>9d}")
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

    dataset, split = load_split(args.data, split_config_from_args(args))
    snapshot = KnowledgeSnapshot(args.knowledge) if args.knowledge else None
    result = train(dataset, split, snapshot, _train_config(args))
    out = save_artifact(args.out, result.model, result.encoder, result.artifact_fields(split), args.overwrite)
    if args.json:
        print(json.dumps(result.metrics, indent=2))
    else:
        print(format_metrics(result.metrics))
        print(f"trained in {result.seconds:.1f}s (best epoch {result.best_epoch}); artifact written to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from offline.common import load_split
    from offline.data.split import SplitConfig
    from offline.training.metrics import summarize
    from offline.training.trainer import check_snapshot_split
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
    from offline.training.compare import run_compare

    seeds = [int(s) for s in args.seed_list] if args.seed_list else list(range(args.seeds))
    run_compare(args, seeds, _train_config)
    return 0
