"""Importers on small raw files written here in each source's own format, with exact expected counts."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offline.data.importers.amazon import import_amazon, scenario_name_from_file
from offline.data.importers.kuaisar import import_kuaisar
from offline.data.importers.movielens import GenreGroup, import_movielens
from offline.data.split import make_split
from shared.dataset.folder import read_dataset, write_dataset
from shared.errors import DatasetError, UserFacingError


def write_ml100k(root: Path) -> Path:
    root.mkdir()
    (root / "u.data").write_text("1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t881250951\n2\t3\t2\t881250952\n")
    genres = ["0"] * 19
    action = genres.copy()
    action[1] = "1"  # Action
    kids = genres.copy()
    kids[3], kids[4] = "1", "1"  # Animation, Children's
    drama = genres.copy()
    drama[8] = "1"
    lines = [
        "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(kids),
        "2|Café Society (1995)|01-Jan-1995||http://x|" + "|".join(drama),
        "3|Heat (1995)|01-Jan-1995||http://x|" + "|".join(action),
    ]
    (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def test_movielens_100k(tmp_path):
    ds = import_movielens(write_ml100k(tmp_path / "ml"))
    assert len(ds.interactions) == 4 and ds.interactions["user_id"].nunique() == 2
    assert ds.has_ratings and ds.has_timestamps
    scen = ds.items.set_index("item_id")["scenario"].to_dict()
    assert scen == {"1": "family", "2": "drama_romance", "3": "action_scifi"}
    assert ds.items.set_index("item_id").loc["2", "title"] == "Café Society (1995)"  # latin-1 decoded
    assert ds.user_feature_columns == ["age", "gender", "occupation"]
    out = write_dataset(ds, tmp_path / "out")
    assert read_dataset(out).fingerprint() == ds.fingerprint()


def test_movielens_csv_family_with_quotes_and_crlf(tmp_path):
    root = tmp_path / "mlcsv"
    root.mkdir()
    (root / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n1,10,4.0,100\r\n1,20,2.5,101\r\n2,10,3.5,102\r\n2,30,5.0,103\r\n"
        b"3,20,1.0,104\r\n"
    )
    (root / "movies.csv").write_bytes(
        b'movieId,title,genres\r\n10,"American President, The (1995)",Comedy|Drama|Romance\r\n'
        b"20,Heat (1995),Action|Crime|Thriller\r\n30,Unknown Film (2001),(no genres listed)\r\n"
    )
    ds = import_movielens(root)
    assert len(ds.interactions) == 5 and ds.interactions["user_id"].nunique() == 3
    items = ds.items.set_index("item_id")
    assert items.loc["10", "title"] == "American President, The (1995)"
    assert items.loc["10", "scenario"] == "comedy"  # comedy group precedes drama_romance
    assert items.loc["20", "scenario"] == "thriller_horror"  # thriller group precedes action
    assert items.loc["30", "scenario"] == "other"
    custom = import_movielens(root, (GenreGroup("dramas", "Dramas", ("Drama",)),))
    assert set(custom.items["scenario"]) == {"dramas", "other"}
    # every user has fewer than 3 ratings, so all 5 rows stay in train; label = rating > 3
    labels = make_split(ds).train.sort_values("_seq")["label"].tolist()
    assert labels == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_movielens_bad_rating_names_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n1,10,oops,101\n")
    (root / "movies.csv").write_text("movieId,title,genres\n10,A,Drama\n")
    with pytest.raises(DatasetError) as info:
        import_movielens(root)
    assert (info.value.file, info.value.line, info.value.column) == ("ratings.csv", 3, "rating")


def _gz_lines(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    return path


def test_amazon_2018_two_category_files(tmp_path):
    arts = _gz_lines(
        tmp_path / "Arts_Crafts_and_Sewing_5.json.gz",
        [
            {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 100},
            {"reviewerID": "U1", "asin": "A2", "overall": 2.0, "unixReviewTime": 50},
            {"reviewerID": "U2", "asin": "A1", "overall": 4.0, "unixReviewTime": 70},
        ],
    )
    office = _gz_lines(
        tmp_path / "Office_Products_5.json.gz",
        [
            {"reviewerID": "U1", "asin": "O1", "overall": 4.0, "unixReviewTime": 80},
            {"reviewerID": "U2", "asin": "O1", "overall": 1.0, "unixReviewTime": 90},
        ],
    )
    meta = _gz_lines(
        tmp_path / "meta.json.gz",
        [
            {"asin": "A1", "title": "Acrylic paint set", "category": ["Arts", "Painting"]},
            {"asin": "O1", "title": "Stapler", "category": ["Office", "Desk"]},
            {"asin": "ZZ", "title": "unused"},
        ],
    )
    ds = import_amazon([arts, office], [meta])
    assert ds.scenario_names == ["arts_crafts_and_sewing", "office_products"]
    assert len(ds.interactions) == 5 and ds.interactions["user_id"].nunique() == 2
    assert len(ds.items) == 3
    items = ds.items.set_index("item_id")
    assert items.loc["A1", "category"] == "Arts > Painting"
    assert items.loc["A2", "title"] == "Amazon product A2"  # no metadata: a placeholder title
    u1 = ds.interactions[ds.interactions["user_id"] == "U1"]
    assert u1["item_id"].tolist() == ["A2", "O1", "A1"]  # chronological
    implicit = import_amazon([arts, office], [meta], scenario_names=["arts", "office"], implicit=True)
    assert implicit.is_implicit and implicit.scenario_names == ["arts", "office"]


def test_amazon_2023_fields(tmp_path):
    reviews = tmp_path / "Books.jsonl"
    reviews.write_text(
        json.dumps({"user_id": "X", "parent_asin": "P1", "asin": "c1", "rating": 5, "timestamp": 1600000000000}) + "\n"
    )
    meta = tmp_path / "meta_Books.jsonl"
    meta.write_text(json.dumps({"parent_asin": "P1", "title": "A novel", "main_category": "Books"}) + "\n")
    ds = import_amazon([reviews], [meta])
    assert ds.scenario_names == ["books"]
    assert ds.interactions["timestamp"].iloc[0] == pytest.approx(1600000000.0)
    assert ds.items.iloc[0][["title", "category"]].tolist() == ["A novel", "Books"]


def test_amazon_metadata_is_json_not_code(tmp_path):
    reviews = _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "U", "asin": "A", "overall": 5, "unixReviewTime": 1}])
    meta = tmp_path / "meta.json"
    meta.write_text("{'asin': 'A', 'title': __import__('os').getcwd()}\n")
    with pytest.raises(DatasetError) as info:
        import_amazon([reviews], [meta])
    assert info.value.file == "meta.json" and info.value.line == 1


def test_amazon_missing_field(tmp_path):
    reviews = _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "U", "asin": "A", "unixReviewTime": 1}])
    with pytest.raises(DatasetError, match="missing field 'overall'"):
        import_amazon([reviews])


def test_scenario_name_from_file():
    assert scenario_name_from_file("reviews_Office_Products_5.json.gz") == "office_products"
    assert scenario_name_from_file("/x/Arts_Crafts_and_Sewing.jsonl") == "arts_crafts_and_sewing"


def write_kuaisar(root: Path) -> Path:
    root.mkdir()
    (root / "rec_inter.csv").write_text(
        "user_id,item_id,time,click,like\n1,100,1000,1,0\n1,101,1001,0,0\n2,100,1002,1,1\n"
    )
    (root / "src_inter.csv").write_text(
        "user_id,search_session_id,search_session_timestamp,keyword,item_id,click_cnt,item_type\n"
        "1,s1,999,k,102,1,VIDEO\n2,s2,1003,k,103,0,VIDEO\n"
    )
    (root / "item_features.csv").write_text(
        "item_id,first_level_category_name_en,second_level_category_name_en\n100,Sports,Football\n101,Food,UNKNOWN\n"
    )
    return root


def test_kuaisar(tmp_path):
    ds = import_kuaisar(write_kuaisar(tmp_path / "k"))
    assert ds.scenario_names == ["recommendation", "search"]
    assert len(ds.interactions) == 5 and len(ds.items) == 4
    assert ds.interactions.groupby("scenario").size().to_dict() == {"recommendation": 3, "search": 2}
    items = ds.items.set_index("item_id")
    assert items.loc["100", "title"] == "Sports > Football"
    assert items.loc["101", "title"] == "Food"
    assert items.loc["103", "title"] == "short video"
    u1 = ds.interactions[ds.interactions["user_id"] == "1"]
    assert u1["item_id"].tolist() == ["102", "100", "101"]
    assert ds.interactions.set_index(["user_id", "item_id"]).loc[("2", "103"), "label"] == 0
    write_dataset(ds, tmp_path / "out")  # validates through the folder reader


def test_kuaisar_missing_file(tmp_path):
    root = write_kuaisar(tmp_path / "k")
    (root / "src_inter.csv").unlink()
    with pytest.raises(DatasetError, match="src_inter.csv"):
        import_kuaisar(root)


def test_cli_import_movielens_and_stats(tmp_path):
    src = write_ml100k(tmp_path / "ml")
    out = tmp_path / "out"
    run = [sys.executable, "-m", "llm4msr_cli", "data"]
    proc = subprocess.run([*run, "import", "movielens", str(src), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(subprocess.run([*run, "stats", str(out), "--json"], capture_output=True, text=True).stdout)
    assert stats["users"] == 2 and stats["interactions"] == 4 and stats["feedback"] == "rating"
    again = subprocess.run([*run, "import", "movielens", str(src), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_unknown_source_folder(tmp_path):
    with pytest.raises(UserFacingError, match="no MovieLens files"):
        import_movielens(tmp_path)
