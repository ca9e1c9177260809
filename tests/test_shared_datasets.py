"""The real datasets in ../shared/data import with the expected sizes (skipped where the folder is absent)."""

from __future__ import annotations

from offline.data.importers.movielens import import_movielens
from offline.data.split import make_split
from shared.dataset.folder import read_dataset


def test_ml_latest_small(shared_data):
    ds = import_movielens(shared_data / "ml-latest-small")
    assert ds.interactions["user_id"].nunique() == 610
    assert len(ds.interactions) == 100_836
    assert len(ds.items) == 9_742
    split = make_split(ds)
    assert sum(len(f) for f in split.frames().values()) == 100_836  # explicit ratings: no sampled rows
    train_last = split.train.groupby("user_id")["timestamp"].max()
    test_first = split.test.groupby("user_id")["timestamp"].min()
    assert (train_last.loc[test_first.index] <= test_first).all()


def test_amazon_arts_office(shared_data):
    ds = read_dataset(shared_data / "amazon-arts-office")
    assert ds.interactions["user_id"].nunique() == 9_577
    assert ds.scenario_names == ["arts_crafts", "office"]
    per_user = ds.interactions.groupby("user_id")["scenario"].nunique()
    assert (per_user == 2).all()  # every user in both scenarios
    split = make_split(ds)
    positives = sum(int((~f["sampled"]).sum()) for f in split.frames().values())
    assert positives == 208_391
    assert sum(int(f["sampled"].sum()) for f in split.frames().values()) == 4 * 208_391
