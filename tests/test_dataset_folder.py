"""The dataset folder contract: round trip, and bad input that fails clearly without writing anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.dataset.folder import read_dataset, write_dataset
from shared.errors import DatasetError, UserFacingError

SCENARIOS = "scenario,description\nbooks,A bookstore\nhome,A home store\n"
ITEMS = "item_id,title,category,scenario\ni1,Red lamp,lamp,home\ni2,Blue novel,novel,books\ni3,Green mug,mug,home\n"
INTERACTIONS = "user_id,item_id,scenario,label,timestamp\nu1,i1,home,1,10\nu1,i2,books,0,20\nu2,i3,home,1,5\n"


def make_folder(root: Path, **overrides: str | bytes) -> Path:
    files = {"scenarios.csv": SCENARIOS, "items.csv": ITEMS, "interactions.csv": INTERACTIONS}
    files.update({k.replace("__", "."): v for k, v in overrides.items()})
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if content is None:
            continue
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_round_trip_keeps_content(tmp_path):
    ds = read_dataset(make_folder(tmp_path / "src"))
    assert ds.scenario_names == ["books", "home"]
    assert ds.has_labels and ds.has_timestamps and not ds.is_implicit
    out = write_dataset(ds, tmp_path / "copy")
    again = read_dataset(out)
    assert again.fingerprint() == ds.fingerprint()
    assert list(again.interactions["label"]) == [1.0, 0.0, 1.0]


def test_extra_columns_and_users_file(tmp_path):
    inter = "user_id,item_id,scenario,device\nu1,i1,home,ios\nu2,i2,books,android\n"
    root = make_folder(tmp_path / "d", interactions__csv=inter)
    (root / "users.csv").write_text("user_id,age\nu1,20\nu2,30\n")
    ds = read_dataset(root)
    assert ds.is_implicit
    assert ds.extra_columns == ["device"]
    assert ds.user_feature_columns == ["age"]


BAD_CASES = {
    "missing column": (
        {"interactions__csv": "user_id,item_id\nu1,i1\n"},
        "interactions.csv",
        1,
        "scenario",
        "missing column",
    ),
    "unknown scenario": (
        {"interactions__csv": "user_id,item_id,scenario\nu1,i1,home\nu1,i2,garden\n"},
        "interactions.csv",
        3,
        "scenario",
        "unknown scenario 'garden'",
    ),
    "duplicate item ids": (
        {"items__csv": "item_id,title\ni1,a\ni2,b\ni1,c\n"},
        "items.csv",
        4,
        "item_id",
        "duplicate item id 'i1'",
    ),
    "NaN label": (
        {"interactions__csv": "user_id,item_id,scenario,label\nu1,i1,home,1\nu1,i2,books,NaN\n"},
        "interactions.csv",
        3,
        "label",
        "not a finite number",
    ),
    "empty label": (
        {"interactions__csv": "user_id,item_id,scenario,label\nu1,i1,home,\n"},
        "interactions.csv",
        2,
        "label",
        "not a finite number",
    ),
    "label not binary": (
        {"interactions__csv": "user_id,item_id,scenario,label\nu1,i1,home,3\n"},
        "interactions.csv",
        2,
        "label",
        "must be 0 or 1",
    ),
    "unknown item": (
        {"interactions__csv": "user_id,item_id,scenario\nu1,i9,home\n"},
        "interactions.csv",
        2,
        "item_id",
        "unknown item id 'i9'",
    ),
    "empty file": ({"items__csv": ""}, "items.csv", None, None, "file is empty"),
    "header only": ({"interactions__csv": "user_id,item_id,scenario\n"}, "interactions.csv", 2, None, "no rows"),
    "wrong encoding": (
        {"items__csv": "item_id,title\ni1,ok\ni2,Caf\xe9\n".encode("latin-1")},
        "items.csv",
        3,
        None,
        "not valid UTF-8",
    ),
    "bad timestamp": (
        {"interactions__csv": "user_id,item_id,scenario,timestamp\nu1,i1,home,yesterday-ish\n"},
        "interactions.csv",
        2,
        "timestamp",
        "neither a number nor a date",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_line_and_column(tmp_path, case):
    overrides, file, line, column, message = BAD_CASES[case]
    root = make_folder(tmp_path / "bad", **overrides)
    with pytest.raises(DatasetError) as info:
        read_dataset(root)
    err = info.value
    assert err.file == file
    assert err.line == line
    assert err.column == column
    assert message in str(err)


@pytest.mark.parametrize("case", ["unknown scenario", "NaN label", "wrong encoding"])
def test_cli_import_of_bad_folder_writes_nothing(tmp_path, case):
    overrides = BAD_CASES[case][0]
    root = make_folder(tmp_path / "bad", **overrides)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "data", "import", "folder", str(root), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert BAD_CASES[case][1] in proc.stderr
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_overwrite_keeps_old_folder_when_new_data_is_bad(tmp_path):
    good = read_dataset(make_folder(tmp_path / "good"))
    out = write_dataset(good, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserFacingError):
        write_dataset(good, out)  # exists, no overwrite
    broken = read_dataset(make_folder(tmp_path / "good2"))
    broken.interactions.loc[0, "scenario"] = "nowhere"
    with pytest.raises(DatasetError):
        write_dataset(broken, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_parquet_interactions_round_trip(tmp_path):
    ds = read_dataset(make_folder(tmp_path / "src"))
    out = write_dataset(ds, tmp_path / "pq", interactions_format="parquet")
    assert (out / "interactions.parquet").exists() and not (out / "interactions.csv").exists()
    assert read_dataset(out).fingerprint() == ds.fingerprint()


def _parquet_folder(root: Path, frame) -> Path:
    make_folder(root, interactions__csv=None)
    frame.to_parquet(root / "interactions.parquet", index=False)
    return root


@pytest.mark.parametrize(
    ("column", "null"),
    [("user_id", None), ("item_id", float("nan")), ("scenario", None)],
    ids=["user_id None", "item_id NaN", "scenario None"],
)
def test_parquet_null_id_fails_with_file_row_and_column(tmp_path, column, null):
    """A null id must not become the id "None" or "nan": the error names the file, the row and the column."""
    import pandas as pd

    frame = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "item_id": ["i1", "i2", "i3"], "scenario": ["home", "books", "home"]}
    )
    frame[column] = frame[column].astype(object)
    frame.loc[1, column] = null
    root = _parquet_folder(tmp_path / "d", frame)
    with pytest.raises(DatasetError) as info:
        read_dataset(root)
    err = info.value
    assert err.file == "interactions.parquet" and err.column == column
    assert f"null {column}" in str(err) and "row 2" in str(err), str(err)
    proc = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "data", "validate", str(root)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "interactions.parquet" in proc.stderr and "row 2" in proc.stderr and column in proc.stderr


def test_parquet_nulls_elsewhere_read_like_empty_csv_cells(tmp_path):
    """A null extra feature is the empty category (not "None"); a null label fails its own check, naming the row."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["i1", "i2", "i3"],
            "scenario": ["home", "books", "home"],
            "device": ["ios", None, "android"],
            "timestamp": [10, 20, 5],
        }
    )
    ds = read_dataset(_parquet_folder(tmp_path / "ok", frame))
    assert ds.interactions["device"].tolist() == ["ios", "", "android"]
    assert ds.interactions["user_id"].tolist() == ["u1", "u1", "u2"]

    frame["label"] = [1.0, 0.0, None]
    with pytest.raises(DatasetError) as info:
        read_dataset(_parquet_folder(tmp_path / "bad", frame))
    assert info.value.column == "label" and "row 3" in str(info.value), str(info.value)
