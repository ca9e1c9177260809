"""The dataset folder: the one format every source is imported into and everything downstream reads.

Files (docs/architecture.md, Dataset folder):
  scenarios.csv               scenario, description
  items.csv                   item_id, title, category (optional), scenario (optional)
  interactions.csv|.parquet   user_id, item_id, scenario, label | rating (optional), timestamp (optional), extras
  users.csv (optional)        user_id, categorical features

`label` is a 0/1 click; `rating` is an explicit rating turned into a label at split time (rating > threshold);
with neither, rows are implicit positives and negatives are sampled. Without `timestamp`, each user's rows are in
chronological order in the file. Any other interaction column is a categorical feature. IDs are strings.
Line numbers in errors count the header as line 1; a Parquet file has no header line, so its errors name the row
(the first row is row 1).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.atomic import replace_dir_atomically
from shared.errors import DatasetError, UserFacingError

SCENARIOS_FILE = "scenarios.csv"
ITEMS_FILE = "items.csv"
INTERACTIONS_CSV = "interactions.csv"
INTERACTIONS_PARQUET = "interactions.parquet"
USERS_FILE = "users.csv"

# Interaction columns with a fixed meaning; every other column is an extra categorical feature.
RESERVED_INTERACTION_COLUMNS = ("user_id", "item_id", "scenario", "label", "rating", "timestamp")
# Internal column: the row's position in the file, the chronological tie-breaker. Never written.
SEQ = "_seq"


@dataclass
class Dataset:
    """A validated dataset folder held in memory. All id columns are str."""

    scenarios: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    name: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def scenario_names(self) -> list[str]:
        return self.scenarios["scenario"].tolist()

    @property
    def has_labels(self) -> bool:
        return "label" in self.interactions.columns

    @property
    def has_ratings(self) -> bool:
        return "rating" in self.interactions.columns

    @property
    def is_implicit(self) -> bool:
        return not (self.has_labels or self.has_ratings)

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.interactions.columns

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.interactions.columns if c not in RESERVED_INTERACTION_COLUMNS and c != SEQ]

    @property
    def user_feature_columns(self) -> list[str]:
        if self.users is None:
            return []
        return [c for c in self.users.columns if c != "user_id"]

    def fingerprint(self) -> str:
        """A content hash: the same data gives the same fingerprint wherever it is stored."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, frame in self._frames():
                h.update(name.encode())
                cols = [c for c in frame.columns if c != SEQ]
                h.update("\x1f".join(cols).encode())
                canonical = pd.DataFrame(
                    {
                        c: frame[c].astype("float64")
                        if pd.api.types.is_numeric_dtype(frame[c])
                        else frame[c].astype(str)
                        for c in cols
                    }
                )
                hashed = pd.util.hash_pandas_object(canonical, index=False).to_numpy()
                h.update(hashed.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _frames(self) -> list[tuple[str, pd.DataFrame]]:
        frames = [("scenarios", self.scenarios), ("items", self.items), ("interactions", self.interactions)]
        if self.users is not None:
            frames.append(("users", self.users))
        return frames


# ----------------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DatasetError(path.name, "file is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            path.name,
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "re-encode the file as UTF-8 or import it with the importer for its source",
            line=line,
        ) from None


def read_csv_strict(path: Path) -> pd.DataFrame:
    """Reads a CSV as strings, failing with the file and line on bad encoding or broken rows."""
    text = _read_text(path)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.ParserError as exc:
        raise DatasetError(path.name, f"cannot parse CSV: {exc}") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(path.name, "file is empty") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame) == 0:
        raise DatasetError(path.name, "file has a header but no rows", line=2)
    return frame


def _require_columns(frame: pd.DataFrame, file: str, required: Iterable[str]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(file, f"missing column(s) {missing}; found {list(frame.columns)}", line=1, column=missing[0])


def _first_bad(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


def row_error(file: str, message: str, row: int, column: str | None = None, line_offset: int = 2) -> DatasetError:
    """The error for the 0-based data row `row`: its line in a text file (line_offset 2 below a header line), or
    its row number (from 1) in a Parquet file, which has no lines."""
    if file.endswith(".parquet"):
        return DatasetError(file, f"{message} (row {row + 1}, counting from 1)", column=column)
    return DatasetError(file, message, line=row + line_offset, column=column)


def _check_nonempty(frame: pd.DataFrame, file: str, columns: Iterable[str]) -> None:
    for col in columns:
        bad = _first_bad((frame[col].str.strip() == "").to_numpy())
        if bad is not None:
            raise row_error(file, "empty value", bad, col)


def _check_unique(frame: pd.DataFrame, file: str, column: str, what: str) -> None:
    bad = _first_bad(frame[column].duplicated().to_numpy())
    if bad is not None:
        raise row_error(file, f"duplicate {what} '{frame[column].iloc[bad]}'", bad, column)


def _check_member(frame: pd.DataFrame, file: str, column: str, valid: pd.Index | set, what: str) -> None:
    values = frame[column]
    mask = ~values.isin(valid)
    bad = _first_bad(mask.to_numpy())
    if bad is not None:
        shown = sorted(valid)[:10] if len(valid) <= 10 else f"{len(valid)} known {what}s"
        raise row_error(file, f"unknown {what} '{values.iloc[bad]}' (valid: {shown})", bad, column)


def parse_numeric(frame: pd.DataFrame, file: str, column: str, line_offset: int = 2) -> pd.Series:
    """Numbers of a string column; the first non-number fails with its line (line_offset: 2 with a header)."""
    raw = frame[column]
    values = pd.to_numeric(raw.str.strip().replace("", np.nan), errors="coerce")
    bad = _first_bad(~np.isfinite(values.to_numpy(dtype=float)))
    if bad is not None:
        raise row_error(file, f"not a finite number: '{raw.iloc[bad]}'", bad, column, line_offset)
    return values


def parse_timestamp(frame: pd.DataFrame, file: str, column: str = "timestamp") -> pd.Series:
    """Unix seconds (float) from numbers or date strings; the first unparseable value fails with its line."""
    raw = frame[column].str.strip()
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all():
        return numeric.astype("float64")
    parsed = pd.to_datetime(raw, errors="coerce", utc=True)
    bad = _first_bad((numeric.isna() & parsed.isna()).to_numpy())
    if bad is not None:
        raise row_error(file, f"timestamp '{raw.iloc[bad]}' is neither a number nor a date", bad, column)
    return numeric.fillna(parsed.astype("int64") / 1e9).astype("float64")


# Parquet interaction columns that may not hold nulls: ids have no meaning when missing (astype(str) would turn them
# into the ids "None" or "nan").
REQUIRED_VALUE_COLUMNS = ("user_id", "item_id", "scenario")


def _read_parquet_interactions(path: Path) -> pd.DataFrame:
    """The Parquet interactions as strings, like a CSV read: a null id fails with its row and column, any other
    null becomes "" (an empty CSV cell: a missing label/rating/timestamp then fails its own check, a missing extra
    feature is the empty category)."""
    frame = pd.read_parquet(path).reset_index(drop=True)
    if len(frame) == 0:
        raise DatasetError(path.name, "file has no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in frame.columns:
        null = frame[col].isna().to_numpy()
        bad = _first_bad(null)
        if bad is not None and col in REQUIRED_VALUE_COLUMNS:
            raise row_error(path.name, f"null {col} ({int(null.sum())} null value(s) in this column)", bad, col)
        text = frame[col].astype(str)
        if bad is not None:
            text[null] = ""
        frame[col] = text
    return frame


def _read_interactions(root: Path) -> tuple[pd.DataFrame, str]:
    csv_path, pq_path = root / INTERACTIONS_CSV, root / INTERACTIONS_PARQUET
    if csv_path.exists() and pq_path.exists():
        raise UserFacingError(f"{root}: both {INTERACTIONS_CSV} and {INTERACTIONS_PARQUET} exist; keep one")
    if pq_path.exists():
        return _read_parquet_interactions(pq_path), INTERACTIONS_PARQUET
    if csv_path.exists():
        return read_csv_strict(csv_path), INTERACTIONS_CSV
    raise DatasetError(INTERACTIONS_CSV, f"not found in {root} (nor {INTERACTIONS_PARQUET})")


def read_dataset(root: str | os.PathLike) -> Dataset:
    """Reads and validates a dataset folder; raises DatasetError naming file, line and column."""
    root = Path(root)
    if not root.is_dir():
        raise UserFacingError(f"dataset folder not found: {root}")
    for required in (SCENARIOS_FILE, ITEMS_FILE):
        if not (root / required).exists():
            raise DatasetError(required, f"not found in {root}")

    scenarios = read_csv_strict(root / SCENARIOS_FILE)
    _require_columns(scenarios, SCENARIOS_FILE, ["scenario", "description"])
    scenarios["scenario"] = scenarios["scenario"].str.strip()
    _check_nonempty(scenarios, SCENARIOS_FILE, ["scenario", "description"])
    _check_unique(scenarios, SCENARIOS_FILE, "scenario", "scenario")
    scenarios = scenarios[["scenario", "description"]].reset_index(drop=True)
    valid_scenarios = set(scenarios["scenario"])

    items = read_csv_strict(root / ITEMS_FILE)
    _require_columns(items, ITEMS_FILE, ["item_id", "title"])
    items["item_id"] = items["item_id"].str.strip()
    _check_nonempty(items, ITEMS_FILE, ["item_id", "title"])
    _check_unique(items, ITEMS_FILE, "item_id", "item id")
    for optional in ("category", "scenario"):
        if optional not in items.columns:
            items[optional] = ""
    with_scenario = items[items["scenario"] != ""]
    if len(with_scenario):
        mask = (items["scenario"] != "") & ~items["scenario"].isin(valid_scenarios)
        bad = _first_bad(mask.to_numpy())
        if bad is not None:
            raise DatasetError(
                ITEMS_FILE,
                f"unknown scenario '{items['scenario'].iloc[bad]}' (valid: {sorted(valid_scenarios)})",
                line=bad + 2,
                column="scenario",
            )
    items = items[["item_id", "title", "category", "scenario"]].reset_index(drop=True)

    inter, inter_file = _read_interactions(root)
    _require_columns(inter, inter_file, ["user_id", "item_id", "scenario"])
    for col in ("user_id", "item_id", "scenario"):
        inter[col] = inter[col].str.strip()
    _check_nonempty(inter, inter_file, ["user_id", "item_id", "scenario"])
    _check_member(inter, inter_file, "scenario", valid_scenarios, "scenario")
    _check_member(inter, inter_file, "item_id", pd.Index(items["item_id"]), "item id")
    if "label" in inter.columns and "rating" in inter.columns:
        raise DatasetError(inter_file, "has both 'label' and 'rating'; keep one", line=1, column="rating")
    if "label" in inter.columns:
        labels = parse_numeric(inter, inter_file, "label")
        bad = _first_bad(~labels.isin([0, 1]).to_numpy())
        if bad is not None:
            raise DatasetError(
                inter_file, f"label must be 0 or 1, got '{inter['label'].iloc[bad]}'", line=bad + 2, column="label"
            )
        inter["label"] = labels.astype("float32")
    if "rating" in inter.columns:
        inter["rating"] = parse_numeric(inter, inter_file, "rating").astype("float32")
    if "timestamp" in inter.columns:
        inter["timestamp"] = parse_timestamp(inter, inter_file)
    inter[SEQ] = np.arange(len(inter), dtype=np.int64)
    inter = inter.reset_index(drop=True)

    users = None
    if (root / USERS_FILE).exists():
        users = read_csv_strict(root / USERS_FILE)
        _require_columns(users, USERS_FILE, ["user_id"])
        users["user_id"] = users["user_id"].str.strip()
        _check_nonempty(users, USERS_FILE, ["user_id"])
        _check_unique(users, USERS_FILE, "user_id", "user id")
    return Dataset(scenarios=scenarios, items=items, interactions=inter, users=users, name=root.name)


# ----------------------------------------------------------------------------------------------- writing


def _format_interactions(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.drop(columns=[SEQ], errors="ignore").copy()
    if "label" in out.columns:
        out["label"] = out["label"].astype(int)
    if "timestamp" in out.columns:
        ts = out["timestamp"]
        if np.all(np.mod(ts.to_numpy(dtype=float), 1) == 0):
            out["timestamp"] = ts.astype("int64")
    return out


def write_dataset(
    dataset: Dataset,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    interactions_format: str = "csv",
    validate: bool = True,
) -> Path:
    """Writes a dataset folder atomically (temp folder, then rename).

    With validate, the written files are read back through read_dataset before the folder becomes visible, so an
    importer can never leave a folder that downstream readers reject.
    """
    if interactions_format not in ("csv", "parquet"):
        raise UserFacingError(f"interactions format must be csv or parquet, got {interactions_format!r}")

    def build(tmp: Path) -> None:
        dataset.scenarios.to_csv(tmp / SCENARIOS_FILE, index=False)
        dataset.items.to_csv(tmp / ITEMS_FILE, index=False)
        inter = _format_interactions(dataset.interactions)
        if interactions_format == "csv":
            inter.to_csv(tmp / INTERACTIONS_CSV, index=False)
        else:
            inter.to_parquet(tmp / INTERACTIONS_PARQUET, index=False)
        if dataset.users is not None:
            dataset.users.to_csv(tmp / USERS_FILE, index=False)
        if validate:
            read_dataset(tmp)

    return replace_dir_atomically(build, out_dir, overwrite=overwrite)
