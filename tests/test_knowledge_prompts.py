"""Prompt builders: train-only history, recency order, K and token budget, template hashing."""

from __future__ import annotations

import pandas as pd
import pytest

from offline.data.split import SplitConfig, make_split
from offline.knowledge import prompts as P
from shared.dataset.folder import Dataset, read_dataset


def _dataset(rows: list[tuple[str, str, str]], titles: dict[str, str]) -> Dataset:
    scenarios = pd.DataFrame({"scenario": ["a", "b"], "description": ["Store A sells pens", "Store B sells yarn"]})
    items = pd.DataFrame(
        {
            "item_id": list(titles),
            "title": list(titles.values()),
            "category": ["cat"] * len(titles),
            "scenario": ["a"] * len(titles),
        }
    )
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario"])
    inter["label"] = 1.0
    inter["_seq"] = range(len(inter))
    return Dataset(scenarios=scenarios, items=items, interactions=inter, name="t")


def test_user_prompts_use_train_positives_only(synth_dir):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    prompts = P.user_prompts(dataset, split, P.PromptConfig(max_items_per_scenario=1000, history_token_budget=10**6))
    titles = dataset.items.set_index("item_id")["title"]
    train_pos = split.train_positives()
    checked = 0
    for user, prompt in prompts.items():
        train_titles = set(titles[train_pos[train_pos.user_id == user].item_id])
        held_out = pd.concat([split.valid, split.test])
        held_out = held_out[(held_out.user_id == user)]
        for title in set(titles[held_out.item_id]) - train_titles:
            assert f"- {title} (" not in prompt, f"held-out item {title!r} leaked into {user}'s prompt"
            checked += 1
        for title in train_titles:
            assert f"- {title} (" in prompt
    assert checked > 50  # the test looked at real held-out items


def test_recent_k_newest_last_and_budget():
    titles = {f"i{n}": f"title number {n}" for n in range(30)}
    rows = [("u1", f"i{n}", "a") for n in range(30)]
    ds = _dataset(rows, titles)
    split = make_split(ds, SplitConfig(valid_ratio=0.0, test_ratio=0.0, negatives=0))
    prompt = P.user_prompts(ds, split, P.PromptConfig(max_items_per_scenario=5, history_token_budget=10**6))["u1"]
    shown = [n for n in range(30) if f"- title number {n} (" in prompt]
    assert shown == [25, 26, 27, 28, 29]
    assert prompt.index("title number 25") < prompt.index("title number 29")  # newest last
    assert "[a] (30 interactions in total)" in prompt and "[b] no interactions" in prompt
    assert prompt.startswith(P.preamble(ds))  # shared preamble first (prefix caching)

    small = P.user_prompts(ds, split, P.PromptConfig(max_items_per_scenario=20, history_token_budget=30))["u1"]
    kept = [n for n in range(30) if f"- title number {n} (" in small]
    assert kept and kept[-1] == 29 and len(kept) < 20
    per_line = P.approx_token_counter([P.USER_ITEM_LINE.format(title="title number 10", category=" (category: cat)")])
    assert len(kept) * per_line[0] <= 30


def test_template_hash_changes_with_text_and_settings(monkeypatch):
    base = P.template_sha256()
    assert base == P.template_sha256()
    changed = dict(P.TEMPLATES, user_question=P.USER_QUESTION + " Be brief.")
    assert P.template_sha256(templates=changed) != base
    assert P.template_sha256(P.PromptConfig(max_items_per_scenario=10)) != base
    monkeypatch.setitem(P.TEMPLATES, "scenario_question", P.SCENARIO_QUESTION.replace("Focus", "Look"))
    assert P.template_sha256() != base


@pytest.mark.parametrize("level", ["scenario", "item"])
def test_scenario_and_item_texts(synth_dir, level):
    ds = read_dataset(synth_dir)
    if level == "scenario":
        texts = P.scenario_prompts(ds)
        assert sorted(texts) == sorted(ds.scenario_names)
        for s, t in texts.items():
            assert f"'{s}'" in t and all(d in t for d in ds.scenarios.description)
    else:
        texts = P.item_texts(ds)
        row = ds.items.iloc[0]
        assert len(texts) == len(ds.items)
        assert row.title in texts[row.item_id] and row.category in texts[row.item_id]
