"""Amazon reviews importer (JSON lines, optionally gzipped); one review file per scenario (store category).

Both field conventions are read:
  2018: reviews reviewerID, asin, overall, unixReviewTime; metadata asin, title, category (list)
  2023: reviews user_id, parent_asin, rating, timestamp (ms); metadata parent_asin, title, main_category, categories
Metadata lines are parsed as JSON only, never evaluated as code.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from offline.data.importers.registry import ImporterSpec
from shared.dataset.folder import SEQ, Dataset
from shared.errors import DatasetError, UserFacingError

REVIEW_FIELDS = {
    "2018": ("reviewerID", "asin", "overall", "unixReviewTime"),
    "2023": ("user_id", "parent_asin", "rating", "timestamp"),
}


def scenario_name_from_file(path: str | os.PathLike) -> str:
    """'reviews_Office_Products_5.json.gz' -> 'office_products'."""
    stem = Path(path).name.lower()
    stem = re.sub(r"(\.gz|\.jsonl|\.json)+$", "", stem)
    stem = re.sub(r"^(reviews_|meta_)", "", stem)
    stem = re.sub(r"_5$", "", stem)
    return re.sub(r"[^a-z0-9]+", "_", stem).strip("_") or "scenario"


def _open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8")


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(path.name, f"not a JSON object: {exc.msg}", line=line_no) from None
                if not isinstance(record, dict):
                    raise DatasetError(path.name, "not a JSON object", line=line_no)
                yield line_no, record
    except UnicodeDecodeError as exc:
        raise DatasetError(path.name, f"not valid UTF-8: {exc.reason}") from None
    except (OSError, EOFError) as exc:
        raise DatasetError(path.name, f"cannot read: {exc}") from None


def _read_reviews(path: Path, scenario: str) -> pd.DataFrame:
    rows = []
    convention = None
    for line_no, rec in _json_lines(path):
        if convention is None:
            convention = "2023" if "parent_asin" in rec else "2018"
        user_f, item_f, rating_f, time_f = REVIEW_FIELDS[convention]
        for f in (user_f, item_f, rating_f, time_f):
            if rec.get(f) in (None, ""):
                raise DatasetError(path.name, f"missing field '{f}'", line=line_no, column=f)
        try:
            rating = float(rec[rating_f])
            ts = float(rec[time_f])
        except (TypeError, ValueError):
            raise DatasetError(path.name, "rating and time must be numbers", line=line_no, column=rating_f) from None
        if convention == "2023":
            ts /= 1000.0  # milliseconds
        rows.append((str(rec[user_f]), str(rec[item_f]), rating, ts))
    if not rows:
        raise DatasetError(path.name, "no reviews in file")
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    frame["scenario"] = scenario
    return frame


def _title_category(rec: dict) -> tuple[str, str]:
    title = str(rec.get("title") or "").strip()
    cats = rec.get("category") or rec.get("categories") or []
    if cats and isinstance(cats[0], list):  # 2014-style nested category lists
        cats = cats[0]
    category = " > ".join(str(c) for c in cats if str(c).strip())
    if not category:
        category = str(rec.get("main_category") or "").strip()
    return title, category


def import_amazon(
    reviews: Sequence[str | os.PathLike],
    meta: Sequence[str | os.PathLike] = (),
    scenario_names: Sequence[str] | None = None,
    implicit: bool = False,
    min_user_interactions: int = 1,
) -> Dataset:
    """One scenario per review file. implicit=True drops ratings (every review becomes a positive)."""
    if not reviews:
        raise UserFacingError("at least one --reviews file is needed")
    paths = [Path(p) for p in reviews]
    names = list(scenario_names) if scenario_names else [scenario_name_from_file(p) for p in paths]
    if len(names) != len(paths):
        raise UserFacingError(f"{len(names)} scenario names for {len(paths)} review files")
    if len(set(names)) != len(names):
        raise UserFacingError(f"scenario names must differ per review file, got {names}")
    frames = [_read_reviews(p, s) for p, s in zip(paths, names)]
    inter = pd.concat(frames, ignore_index=True)
    inter = inter.drop_duplicates(["user_id", "item_id", "scenario"], keep="first")
    if min_user_interactions > 1:
        counts = inter.groupby("user_id")["item_id"].transform("size")
        inter = inter[counts >= min_user_interactions]
    # An item belongs to the scenario (file) it was first reviewed in.
    item_scenario = inter.drop_duplicates("item_id").set_index("item_id")["scenario"]
    inter = inter.assign(scenario=item_scenario.loc[inter["item_id"]].to_numpy())
    needed = set(item_scenario.index)

    titles: dict[str, tuple[str, str]] = {}
    for m in meta:
        for _, rec in _json_lines(Path(m)):
            item = str(rec.get("parent_asin") or rec.get("asin") or "")
            if item in needed and item not in titles:
                titles[item] = _title_category(rec)
    ids = item_scenario.index.to_numpy()
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [titles.get(i, ("", ""))[0] or f"Amazon product {i}" for i in ids],
            "category": [titles.get(i, ("", ""))[1] for i in ids],
            "scenario": item_scenario.to_numpy(),
        }
    )
    scenarios = pd.DataFrame(
        {
            "scenario": names,
            "description": [f"Amazon {n.replace('_', ' ').title()} store" for n in names],
        }
    )
    columns = (
        ["user_id", "item_id", "scenario", "timestamp"]
        if implicit
        else ["user_id", "item_id", "scenario", "rating", "timestamp"]
    )
    inter = inter.sort_values(["user_id", "timestamp"], kind="mergesort")[columns].reset_index(drop=True)
    inter[SEQ] = np.arange(len(inter), dtype=np.int64)
    return Dataset(scenarios=scenarios, items=items, interactions=inter, name="amazon")


@dataclass(frozen=True)
class AmazonOptions:
    reviews: list[str] = field(
        metadata={"repeat": True, "help": "review file (.json/.jsonl[.gz]); repeat"},
    )
    meta: list[str] = field(
        default_factory=list, metadata={"repeat": True, "help": "metadata file with titles/categories; repeat"}
    )
    scenario_names: list[str] | None = field(
        default=None, metadata={"help": "comma-separated names, one per --reviews file (default: file names)"}
    )
    implicit: bool = field(default=False, metadata={"help": "drop ratings: every review is a positive"})
    min_user_interactions: int = 1


def load(options: AmazonOptions) -> Dataset:
    return import_amazon(
        options.reviews, options.meta, options.scenario_names, options.implicit, options.min_user_interactions
    )


IMPORTER = ImporterSpec(
    name="amazon",
    help="Amazon reviews JSON lines (2018 or 2023 fields), one file per scenario",
    options_class=AmazonOptions,
    load=load,
)
