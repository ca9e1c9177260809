"""Per-user chronological split, labels and seeded negative sampling.

Every model, every control and the knowledge job read the same Split: the user-level prompts are built from
`train` only, and `valid`/`test` are identical across runs for the same data and SplitConfig.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.atomic import replace_dir_atomically
from shared.dataset.folder import SEQ, Dataset
from shared.errors import UserFacingError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How interactions become labelled train/valid/test rows."""

    valid_ratio: float = field(default=0.1, metadata={"help": "share of each user's history"})
    test_ratio: float = field(default=0.1, metadata={"help": "share of each user's history"})
    # Users with fewer interactions than this keep all of them in train (too short to hold out).
    min_interactions: int = field(default=3, metadata={"help": "shorter users stay in train"})
    # Explicit ratings: label = rating > threshold.
    rating_threshold: float = field(default=3.0, metadata={"help": "label = rating > this"})
    # Implicit positives: negatives sampled per positive, same scenario, never an item the user touched.
    negatives: int = field(default=4, metadata={"help": "negatives per implicit positive"})
    seed: int = field(default=2024, metadata={"help": "seed of negative sampling"})

    def __post_init__(self) -> None:
        if not (0 <= self.valid_ratio < 1 and 0 <= self.test_ratio < 1 and self.valid_ratio + self.test_ratio < 1):
            raise UserFacingError(
                f"valid_ratio ({self.valid_ratio}) and test_ratio ({self.test_ratio}) must be in [0, 1) "
                "and sum to less than 1"
            )
        if self.negatives < 0:
            raise UserFacingError(f"negatives must be >= 0, got {self.negatives}")
        if self.min_interactions < 1:
            raise UserFacingError(f"min_interactions must be >= 1, got {self.min_interactions}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    """Labelled rows per split. Columns: user_id, item_id, scenario, label (float32), sampled (bool), _seq,
    timestamp (if the data has it) and the dataset's extra feature columns."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    config: SplitConfig
    dataset_fingerprint: str

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def fingerprint(self) -> str:
        """Identifies the exact rows: dataset content + split config."""
        payload = json.dumps({"data": self.dataset_fingerprint, "split": self.config.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def train_positives(self) -> pd.DataFrame:
        """The user histories the knowledge job may see: observed positive train interactions, in time order."""
        t = self.train
        return t[(t["label"] > 0.5) & ~t["sampled"]]

    def write(self, out_dir: str | os.PathLike, fmt: str = "csv", overwrite: bool = False) -> Path:
        """Exports the exact labelled rows, so that other implementations can train on identical data."""
        if fmt not in ("csv", "parquet"):
            raise UserFacingError(f"split format must be csv or parquet, got {fmt!r}")

        def build(tmp: Path) -> None:
            for name, frame in self.frames().items():
                out = frame.drop(columns=[SEQ]).copy()
                out["label"] = out["label"].astype(int)
                if "timestamp" in out.columns and (out["timestamp"] % 1 == 0).all():
                    out["timestamp"] = out["timestamp"].astype("int64")
                if fmt == "csv":
                    out.to_csv(tmp / f"{name}.csv", index=False, lineterminator="\n")
                else:
                    out.to_parquet(tmp / f"{name}.parquet", index=False)
            meta = {
                "split_config": self.config.to_dict(),
                "dataset_fingerprint": self.dataset_fingerprint,
                "split_fingerprint": self.fingerprint(),
                "rows": {k: len(v) for k, v in self.frames().items()},
                "positives": {k: int((v["label"] > 0.5).sum()) for k, v in self.frames().items()},
            }
            (tmp / "split.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

        return replace_dir_atomically(build, out_dir, overwrite=overwrite)


def _labels(dataset: Dataset, config: SplitConfig) -> np.ndarray:
    inter = dataset.interactions
    if dataset.has_labels:
        return inter["label"].to_numpy(dtype=np.float32)
    if dataset.has_ratings:
        return (inter["rating"].to_numpy() > config.rating_threshold).astype(np.float32)
    return np.ones(len(inter), dtype=np.float32)


def _assign_splits(ordered: pd.DataFrame, config: SplitConfig) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test, by each user's position in time."""
    users = ordered["user_id"].to_numpy()
    pos = ordered.groupby("user_id", sort=False).cumcount().to_numpy()
    n = ordered.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    n_test = np.where(config.test_ratio > 0, np.maximum(1, np.floor(n * config.test_ratio + 0.5)), 0)
    n_valid = np.where(config.valid_ratio > 0, np.maximum(1, np.floor(n * config.valid_ratio + 0.5)), 0)
    short = n < np.maximum(config.min_interactions, 1 + n_test + n_valid)
    part = np.zeros(len(users), dtype=np.int8)
    part[pos >= n - n_test - n_valid] = 1
    part[pos >= n - n_test] = 2
    part[short] = 0
    return part


def _sample_negatives(
    dataset: Dataset, positives: pd.DataFrame, config: SplitConfig, rng: np.random.Generator
) -> pd.DataFrame:
    """k negatives per positive: same scenario's items, never one the user interacted with (any scenario)."""
    items = dataset.items
    item_codes = pd.Index(items["item_id"])
    n_items = len(item_codes)
    user_index = pd.Index(pd.unique(dataset.interactions["user_id"]))
    touched = np.unique(
        user_index.get_indexer(dataset.interactions["user_id"]).astype(np.int64) * n_items
        + item_codes.get_indexer(dataset.interactions["item_id"])
    )
    item_scenario = items["scenario"].to_numpy()
    seen_in = dataset.interactions.groupby("scenario")["item_id"].unique()
    chunks = []
    k = config.negatives
    for scenario in sorted(positives["scenario"].unique()):
        rows = positives[positives["scenario"] == scenario]
        pool = np.flatnonzero(item_scenario == scenario)
        if len(pool) == 0:  # items.csv has no scenario column: the scenario's pool is what was seen in it
            pool = np.sort(item_codes.get_indexer(seen_in[scenario]))
        users = np.repeat(user_index.get_indexer(rows["user_id"]).astype(np.int64), k)
        cand = pool[rng.integers(0, len(pool), size=len(users))]
        for _ in range(200):
            clash = np.isin(users * n_items + cand, touched)
            if not clash.any():
                break
            cand[clash] = pool[rng.integers(0, len(pool), size=int(clash.sum()))]
        else:
            bad = rows["user_id"].iloc[int(np.flatnonzero(clash)[0]) // k]
            raise UserFacingError(
                f"cannot sample {k} negatives for user '{bad}' in scenario '{scenario}': the user interacted "
                f"with (almost) all {len(pool)} items of the scenario; lower --negatives"
            )
        neg = rows.loc[rows.index.repeat(k)].copy()
        neg["item_id"] = item_codes[cand].to_numpy()
        neg["label"] = np.float32(0.0)
        neg["sampled"] = True
        chunks.append(neg)
    return pd.concat(chunks) if chunks else positives.iloc[:0].copy()


def make_split(dataset: Dataset, config: SplitConfig | None = None) -> Split:
    """Splits each user's interactions by time into train/valid/test and labels them."""
    config = config or SplitConfig()
    inter = dataset.interactions.copy()
    inter["label"] = _labels(dataset, config)
    inter = inter.drop(columns=["rating"], errors="ignore")
    inter["sampled"] = False
    sort_cols = ["user_id", "timestamp", SEQ] if dataset.has_timestamps else ["user_id", SEQ]
    ordered = inter.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)
    ordered["_part"] = _assign_splits(ordered, config)
    if dataset.is_implicit and config.negatives > 0:
        rng = np.random.default_rng(config.seed)
        negatives = _sample_negatives(dataset, ordered, config, rng)
        ordered = pd.concat([ordered, negatives])
        # Each positive is followed by its negatives; positives keep their time order.
        ordered = ordered.sort_values(sort_cols + ["sampled"], kind="mergesort").reset_index(drop=True)
    columns = ["user_id", "item_id", "scenario", "label", "sampled", SEQ]
    if dataset.has_timestamps:
        columns.insert(4, "timestamp")
    columns += dataset.extra_columns
    parts = {}
    for code, name in enumerate(SPLITS):
        frame = ordered[ordered["_part"] == code][columns].reset_index(drop=True)
        frame["label"] = frame["label"].astype(np.float32)
        parts[name] = frame
    return Split(**parts, config=config, dataset_fingerprint=dataset.fingerprint())
