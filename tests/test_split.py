"""Chronological split, labels and negative sampling: no leakage, reproducible, exact counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from offline.data.split import SplitConfig, make_split
from offline.data.synth import SynthConfig, generate
from shared.dataset.folder import SEQ, Dataset, read_dataset
from shared.dataset.vocab import OOV_INDEX, Vocabulary
from shared.errors import UserFacingError


def implicit_dataset(users: int = 40, items_per_scenario: int = 30, per_user: int = 12, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    scenarios = pd.DataFrame({"scenario": ["a", "b"], "description": ["store a", "store b"]})
    items = pd.DataFrame(
        {
            "item_id": [f"{s}{i}" for s in "ab" for i in range(items_per_scenario)],
            "title": [f"title {s}{i}" for s in "ab" for i in range(items_per_scenario)],
            "category": "",
            "scenario": [s for s in "ab" for _ in range(items_per_scenario)],
        }
    )
    rows = []
    for u in range(users):
        for s in "ab":
            for i in rng.choice(items_per_scenario, size=per_user // 2, replace=False):
                rows.append((f"u{u}", f"{s}{i}", s))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario"])
    inter = inter.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # interleave scenarios in time
    inter[SEQ] = np.arange(len(inter))
    return Dataset(scenarios=scenarios, items=items, interactions=inter, name="implicit")


def test_every_train_row_precedes_every_test_row():
    split = make_split(generate(SynthConfig(users=50)))
    train_last = split.train.groupby("user_id")["timestamp"].max()
    test_first = split.test.groupby("user_id")["timestamp"].min()
    valid_first = split.valid.groupby("user_id")["timestamp"].min()
    common = train_last.index.intersection(test_first.index)
    assert len(common) == 50
    assert (train_last.loc[common] <= test_first.loc[common]).all()
    assert (train_last.loc[common] <= valid_first.loc[common]).all()
    assert (split.valid.groupby("user_id")["timestamp"].max() <= test_first).all()


def test_split_sizes_follow_ratios_per_user():
    split = make_split(generate(SynthConfig(users=20, scenarios=2, main_impressions=30, side_impressions=10)))
    # 40 interactions per user: 10% = 4 test, 4 valid, 32 train
    assert (split.test.groupby("user_id").size() == 4).all()
    assert (split.valid.groupby("user_id").size() == 4).all()
    assert (split.train.groupby("user_id").size() == 32).all()


def test_short_users_stay_in_train():
    ds = implicit_dataset(users=3, per_user=2)
    split = make_split(ds, SplitConfig(min_interactions=3, negatives=1))
    assert len(split.valid) == 0 and len(split.test) == 0
    assert (split.train["sampled"] == False).sum() == 6  # noqa: E712


def test_negatives_are_same_scenario_and_never_positives():
    ds = implicit_dataset()
    split = make_split(ds, SplitConfig(negatives=4))
    touched = set(zip(ds.interactions["user_id"], ds.interactions["item_id"]))
    item_scenario = ds.items.set_index("item_id")["scenario"]
    for frame in split.frames().values():
        neg = frame[frame["sampled"]]
        pos = frame[~frame["sampled"]]
        assert len(neg) == 4 * len(pos)
        assert (neg["label"] == 0).all() and (pos["label"] == 1).all()
        assert not any((u, i) in touched for u, i in zip(neg["user_id"], neg["item_id"]))
        assert (item_scenario.loc[neg["item_id"]].to_numpy() == neg["scenario"].to_numpy()).all()


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    ds = implicit_dataset()
    a = make_split(ds, SplitConfig(seed=1)).write(tmp_path / "a")
    b = make_split(ds, SplitConfig(seed=1)).write(tmp_path / "b")
    c = make_split(ds, SplitConfig(seed=2)).write(tmp_path / "c")
    for name in ("train.csv", "valid.csv", "test.csv", "split.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "test.csv").read_bytes() != (c / "test.csv").read_bytes()


def test_ratings_become_labels_by_threshold(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "scenarios.csv").write_text("scenario,description\ns,store\n")
    (root / "items.csv").write_text("item_id,title\ni1,a\ni2,b\ni3,c\ni4,d\n")
    (root / "interactions.csv").write_text(
        "user_id,item_id,scenario,rating,timestamp\nu,i1,s,5,1\nu,i2,s,3,2\nu,i3,s,3.5,3\nu,i4,s,1,4\n"
    )
    split = make_split(read_dataset(root), SplitConfig(valid_ratio=0, test_ratio=0))
    assert split.train["label"].tolist() == [1.0, 0.0, 1.0, 0.0]
    split4 = make_split(read_dataset(root), SplitConfig(valid_ratio=0, test_ratio=0, rating_threshold=4))
    assert split4.train["label"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_train_positives_exclude_sampled_and_later_rows():
    ds = implicit_dataset()
    split = make_split(ds)
    hist = split.train_positives()
    assert not hist["sampled"].any() and (hist["label"] == 1).all()
    held_out = set(zip(split.test["user_id"], split.test["item_id"]))
    assert not held_out & set(zip(hist["user_id"], hist["item_id"]))


def test_bad_split_config_is_refused():
    with pytest.raises(UserFacingError, match="sum to less than 1"):
        SplitConfig(valid_ratio=0.5, test_ratio=0.5)


def test_impossible_negative_sampling_is_reported():
    ds = implicit_dataset(users=2, items_per_scenario=3, per_user=6)  # each user touched every item
    with pytest.raises(UserFacingError, match="cannot sample"):
        make_split(ds, SplitConfig(negatives=1))


def test_vocabulary_maps_unknown_to_oov():
    vocab = Vocabulary.build("item_id", ["b", "a", "b", "c"])
    assert vocab.tokens == ["b", "a", "c"] and len(vocab) == 4
    assert vocab.encode(["a", "zzz", "c"]).tolist() == [2, OOV_INDEX, 3]
    assert Vocabulary.from_dict(vocab.to_dict()).encode(["b"]).tolist() == [1]
