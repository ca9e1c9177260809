"""KuaiSAR importer: one app's recommendation feed and search, the two scenarios of the same users.

rec_inter.csv   user_id, item_id, ..., click, timestamp (or time)          -> scenario "recommendation", label = click
src_inter.csv   user_id, search_session_id, search_session_timestamp, keyword, item_id, click_cnt, item_type
                                                                             -> scenario "search", label = click_cnt > 0
item_features.csv  item_id, first_level_category_name_en .. fourth_level_category_name_en (caption optional)
Items have no English title; the title is the English category path (plus the caption when present).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from shared.dataset.folder import SEQ, Dataset
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


def _number(frame: pd.DataFrame, file: str, column: str) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        raise DatasetError(file, f"not a number: '{frame[column].iloc[bad[0]]}'", line=int(bad[0]) + 2, column=column)
    return values


def _time(frame: pd.DataFrame, file: str, column: str) -> pd.Series:
    raw = frame[column]
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all():
        return numeric.astype("float64")
    parsed = pd.to_datetime(raw, errors="coerce", utc=True)
    bad = np.flatnonzero((numeric.isna() & parsed.isna()).to_numpy())
    if len(bad):
        raise DatasetError(file, f"not a time: '{raw.iloc[bad[0]]}'", line=int(bad[0]) + 2, column=column)
    return numeric.fillna(parsed.astype("int64") / 1e9).astype("float64")


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
            "label": (_number(rec, "rec_inter.csv", "click") > 0).astype("float32"),
            "timestamp": _time(rec, "rec_inter.csv", time_col),
        }
    )
    src_frame = pd.DataFrame(
        {
            "user_id": src["user_id"].str.strip(),
            "item_id": src["item_id"].str.strip(),
            "scenario": "search",
            "label": (_number(src, "src_inter.csv", "click_cnt") > 0).astype("float32"),
            "timestamp": _time(src, "src_inter.csv", "search_session_timestamp"),
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
    first_scenario = inter.drop_duplicates("item_id").set_index("item_id")["scenario"].reindex(ids)
    items = pd.DataFrame(
        {"item_id": ids, "title": titles.to_numpy(), "category": first_level.to_numpy(), "scenario": ""}
    )
    # Items appear in both feeds: the scenario column stays empty so negatives come from each scenario's own items.
    del first_scenario
    scenarios = pd.DataFrame({"scenario": list(SCENARIOS), "description": list(SCENARIOS.values())})
    return Dataset(scenarios=scenarios, items=items, interactions=inter, name="kuaisar")
