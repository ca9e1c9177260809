"""KuaiSAR importer: one app's recommendation feed and search, the two scenarios of the same users.

rec_inter.csv   user_id, item_id, ..., click, timestamp (or time)          -> scenario "recommendation", label = click
src_inter.csv   user_id, search_session_id, search_session_timestamp, keyword, item_id, click_cnt, item_type
                                                                             -> scenario "search", label = click_cnt > 0
item_features.csv  item_id, first_level_category_name_en .. fourth_level_category_name_en (caption optional)
Items have no English title; the title is the English category path (plus the caption when present).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from offline.data.importers.registry import ImporterSpec
from shared.dataset.folder import SEQ, Dataset, parse_numeric, parse_timestamp
from shared.errors import DatasetError, UserFacingError

CATEGORY_LEVELS = [f"{lvl}_level_category_name_en" for lvl in ("first", "second", "third", "fourth")]
SCENARIOS = {
    "recommendation": "Short-video recommendation feed: videos pushed to the user without a query",
    "search": "Short-video search: videos the user finds and clicks after typing a query",
}


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DatasetError(path.name, f"not found in {path.parent}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(path.name, f"not valid UTF-8: {exc.reason}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(path.name, f"cannot parse: {exc}") from None
    if frame.empty:
        raise DatasetError(path.name, "file has no rows")
    return frame


def _require(frame: pd.DataFrame, file: str, columns: list[str]) -> None:
    for col in columns:
        if col not in frame.columns:
            raise DatasetError(file, f"missing column '{col}'; found {list(frame.columns)}", line=1, column=col)


def import_kuaisar(path: str | os.PathLike) -> Dataset:
    root = Path(path)
    if not root.is_dir():
        raise UserFacingError(f"KuaiSAR folder not found: {root}")
    rec = _read(root / "rec_inter.csv")
    time_col = "timestamp" if "timestamp" in rec.columns else "time"
    _require(rec, "rec_inter.csv", ["user_id", "item_id", "click", time_col])
    src = _read(root / "src_inter.csv")
    _require(src, "src_inter.csv", ["user_id", "item_id", "click_cnt", "search_session_timestamp"])
    feats = _read(root / "item_features.csv")
    _require(feats, "item_features.csv", ["item_id", CATEGORY_LEVELS[0]])

    rec_frame = pd.DataFrame(
        {
            "user_id": rec["user_id"].str.strip(),
            "item_id": rec["item_id"].str.strip(),
            "scenario": "recommendation",
            "label": (parse_numeric(rec, "rec_inter.csv", "click") > 0).astype("float32"),
            "timestamp": parse_timestamp(rec, "rec_inter.csv", time_col),
        }
    )
    src_frame = pd.DataFrame(
        {
            "user_id": src["user_id"].str.strip(),
            "item_id": src["item_id"].str.strip(),
            "scenario": "search",
            "label": (parse_numeric(src, "src_inter.csv", "click_cnt") > 0).astype("float32"),
            "timestamp": parse_timestamp(src, "src_inter.csv", "search_session_timestamp"),
        }
    )
    inter = pd.concat([rec_frame, src_frame], ignore_index=True)
    inter = inter.sort_values(["user_id", "timestamp"], kind="mergesort").reset_index(drop=True)
    inter[SEQ] = np.arange(len(inter), dtype=np.int64)

    feats = feats.drop_duplicates("item_id").set_index(feats["item_id"].str.strip().rename("id"))
    levels = [c for c in CATEGORY_LEVELS if c in feats.columns]
    path_text = feats[levels].apply(
        lambda row: " > ".join(v for v in row if v and v.upper() not in ("UNKNOWN", "NAN")), axis=1
    )
    ids = pd.unique(inter["item_id"])
    known = path_text.reindex(ids).fillna("")
    caption = feats["caption"].reindex(ids).fillna("") if "caption" in feats.columns else None
    titles = known.where(known != "", "short video")
    if caption is not None:
        titles = (caption.str.strip() + " (" + titles + ")").where(caption.str.strip() != "", titles)
    first_level = feats[CATEGORY_LEVELS[0]].reindex(ids).fillna("")
    items = pd.DataFrame(
        {"item_id": ids, "title": titles.to_numpy(), "category": first_level.to_numpy(), "scenario": ""}
    )
    # Items appear in both feeds: the scenario column stays empty, and each scenario's item pool is what it showed.
    scenarios = pd.DataFrame({"scenario": list(SCENARIOS), "description": list(SCENARIOS.values())})
    return Dataset(scenarios=scenarios, items=items, interactions=inter, name="kuaisar")


@dataclass(frozen=True)
class KuaiSAROptions:
    path: str = field(metadata={"positional": True})


def load(options: KuaiSAROptions) -> Dataset:
    return import_kuaisar(options.path)


IMPORTER = ImporterSpec(
    name="kuaisar",
    help="KuaiSAR rec_inter.csv + src_inter.csv + item_features.csv",
    options_class=KuaiSAROptions,
    load=load,
)
