"""`llm4msr data ...`: import raw sources, make the synthetic default, split, describe."""

from __future__ import annotations

import argparse
import json
import logging
import time

from offline.common import ConfigFlags, add_split_args, split_config_from_args
from offline.data.importers import importer_names, importer_spec
from offline.data.synth import SynthConfig

log = logging.getLogger(__name__)

SYNTH_FLAGS = ConfigFlags(SynthConfig)


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset folder: import, synth, split, stats, validate")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("synth", help="write the synthetic multi-scenario dataset (the embedded default)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    SYNTH_FLAGS.add_to(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(handler=cmd_synth)

    p = dsub.add_parser("import", help="import a raw dataset into the dataset folder format")
    isub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in importer_names():
        spec = importer_spec(name)
        parser = isub.add_parser(name, help=spec.help)
        ConfigFlags(spec.options_class).add_to(parser)
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
    from offline.data.synth import generate
    from shared.dataset.folder import write_dataset

    dataset = generate(SYNTH_FLAGS.build(args))
    out = write_dataset(dataset, args.out, overwrite=args.overwrite)
    print(
        f"wrote synthetic dataset to {out}: {dataset.interactions['user_id'].nunique()} users, "
        f"{len(dataset.items)} items, {len(dataset.interactions)} interactions"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shared.dataset.folder import write_dataset

    start = time.perf_counter()
    spec = importer_spec(args.source)
    dataset = spec.load(ConfigFlags(spec.options_class).build(args))
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
