"""`llm4msr data ...`: import raw sources, make the synthetic default, split, describe."""

from __future__ import annotations

import argparse
import json
import logging
import time

from offline.common import add_split_args, split_config_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset folder: import, synth, split, stats, validate")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("synth", help="write the synthetic multi-scenario dataset (the embedded default)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    from offline.data.synth import SynthConfig

    d = SynthConfig()
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--scenarios", type=int, default=d.scenarios)
    p.add_argument("--items-per-scenario", type=int, default=d.items_per_scenario)
    p.add_argument("--main-impressions", type=int, default=d.main_impressions)
    p.add_argument("--side-impressions", type=int, default=d.side_impressions)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(handler=cmd_synth)

    p = dsub.add_parser("import", help="import a raw dataset into the dataset folder format")
    isub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    m = isub.add_parser(
        "movielens", help="MovieLens 100K (u.data/u.item) or ratings.csv/movies.csv (latest-small, 25M)"
    )
    m.add_argument("path", help="folder with the MovieLens files")
    m.add_argument("--genre-groups", help="JSON list of {scenario, description, genres}: scenario per first match")
    a = isub.add_parser("amazon", help="Amazon reviews JSON lines (2018 or 2023 fields), one file per scenario")
    a.add_argument("--reviews", action="append", required=True, help="review file (.json/.jsonl[.gz]); repeat")
    a.add_argument("--meta", action="append", default=[], help="metadata file with titles/categories; repeat")
    a.add_argument("--scenario-names", help="comma-separated names, one per --reviews file (default: file names)")
    a.add_argument("--implicit", action="store_true", help="drop ratings: every review is a positive")
    a.add_argument("--min-user-interactions", type=int, default=1)
    k = isub.add_parser("kuaisar", help="KuaiSAR rec_inter.csv + src_inter.csv + item_features.csv")
    k.add_argument("path")
    f = isub.add_parser("folder", help="validate and copy a folder that is already in the dataset format")
    f.add_argument("path")
    for parser in (m, a, k, f):
        parser.add_argument("--out", required=True, help="dataset folder to write")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
        parser.add_argument("--format", choices=["csv", "parquet"], default="csv", help="interactions file format")
        parser.set_defaults(handler=cmd_import)

    p = dsub.add_parser("split", help="export the exact labelled train/valid/test split")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--overwrite", action="store_true")
    add_split_args(p)
    p.set_defaults(handler=cmd_split)

    p = dsub.add_parser("stats", help="users, items, interactions, per-scenario counts, user overlap")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_stats)

    p = dsub.add_parser("validate", help="check a dataset folder against the format")
    p.add_argument("data")
    p.set_defaults(handler=cmd_validate)


def cmd_synth(args: argparse.Namespace) -> int:
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    config = SynthConfig(
        users=args.users,
        scenarios=args.scenarios,
        items_per_scenario=args.items_per_scenario,
        main_impressions=args.main_impressions,
        side_impressions=args.side_impressions,
        seed=args.seed,
    )
    dataset = generate(config)
    out = write_dataset(dataset, args.out, overwrite=args.overwrite)
    print(
        f"wrote synthetic dataset to {out}: {dataset.interactions['user_id'].nunique()} users, "
        f"{len(dataset.items)} items, {len(dataset.interactions)} interactions"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shared.dataset.folder import read_dataset, write_dataset

    start = time.perf_counter()
    if args.source == "movielens":
        from offline.data.importers.movielens import DEFAULT_GENRE_GROUPS, import_movielens, load_genre_groups

        groups = load_genre_groups(args.genre_groups) if args.genre_groups else DEFAULT_GENRE_GROUPS
        dataset = import_movielens(args.path, groups)
    elif args.source == "amazon":
        from offline.data.importers.amazon import import_amazon

        names = args.scenario_names.split(",") if args.scenario_names else None
        dataset = import_amazon(args.reviews, args.meta, names, args.implicit, args.min_user_interactions)
    elif args.source == "kuaisar":
        from offline.data.importers.kuaisar import import_kuaisar

        dataset = import_kuaisar(args.path)
    else:
        dataset = read_dataset(args.path)
    out = write_dataset(dataset, args.out, overwrite=args.overwrite, interactions_format=args.format)
    print(
        f"imported {args.source} into {out} in {time.perf_counter() - start:.1f}s: "
        f"{dataset.interactions['user_id'].nunique():,} users, {len(dataset.items):,} items, "
        f"{len(dataset.interactions):,} interactions, scenarios {dataset.scenario_names}"
    )
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from offline.common import load_split

    _, split = load_split(args.data, split_config_from_args(args))
    out = split.write(args.out, fmt=args.format, overwrite=args.overwrite)
    sizes = ", ".join(
        f"{k} {len(v):,} rows ({(v['label'] > 0.5).mean():.1%} positive)" for k, v in split.frames().items()
    )
    print(f"wrote split {split.fingerprint()[:12]} to {out}: {sizes}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from offline.data.stats import dataset_stats, format_stats
    from shared.dataset.folder import read_dataset

    stats = dataset_stats(read_dataset(args.data))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from shared.dataset.folder import read_dataset

    dataset = read_dataset(args.data)
    print(f"{args.data}: valid ({len(dataset.interactions):,} interactions, fingerprint {dataset.fingerprint()[:12]})")
    return 0
