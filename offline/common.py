"""Arguments shared by several offline commands: the dataset folder and how it is split."""

from __future__ import annotations

import argparse
import logging

from offline.data.split import Split, SplitConfig, make_split
from shared.dataset.folder import Dataset, read_dataset

log = logging.getLogger(__name__)


def add_split_args(parser: argparse.ArgumentParser) -> None:
    d = SplitConfig()
    g = parser.add_argument_group("split (must match between knowledge, training and evaluation)")
    g.add_argument("--valid-ratio", type=float, default=d.valid_ratio, help="share of each user's history")
    g.add_argument("--test-ratio", type=float, default=d.test_ratio, help="share of each user's history")
    g.add_argument("--min-interactions", type=int, default=d.min_interactions, help="shorter users stay in train")
    g.add_argument("--rating-threshold", type=float, default=d.rating_threshold, help="label = rating > this")
    g.add_argument("--negatives", type=int, default=d.negatives, help="negatives per implicit positive")
    g.add_argument("--split-seed", type=int, default=d.seed, help="seed of negative sampling")


def split_config_from_args(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(
        valid_ratio=args.valid_ratio,
        test_ratio=args.test_ratio,
        min_interactions=args.min_interactions,
        rating_threshold=args.rating_threshold,
        negatives=args.negatives,
        seed=args.split_seed,
    )


def load_split(data_dir: str, config: SplitConfig) -> tuple[Dataset, Split]:
    dataset = read_dataset(data_dir)
    split = make_split(dataset, config)
    log.info(
        "dataset %s: %d train / %d valid / %d test rows (split %s)",
        dataset.name,
        len(split.train),
        len(split.valid),
        len(split.test),
        split.fingerprint()[:12],
    )
    return dataset, split
