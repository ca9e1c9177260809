"""Leak-free user knowledge, the knowledge side: the per-user fit cutoff, and the fit user vectors a build writes
beside the serve vectors (prompts from the early train history only), with resume, incremental reuse, generate mode,
--fit-share 0 and the knowledge space."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fixtures_llm import counting_executor, kill_build_after_shards, knowledge_config, tiny_model  # noqa: F401  (tiny_model: a fixture)

from offline.data.fit_cutoff import DEFAULT_FIT_SHARE, early_train_mask, fit_history
from offline.data.split import Split, SplitConfig, make_split
from offline.knowledge import prompts as P
from offline.knowledge.build import run_build
from offline.knowledge.show import PROMPTS_FILE
from shared.dataset.folder import read_dataset
from shared.errors import UserFacingError
from shared.knowledge.snapshot import USER_FIT, KnowledgeSnapshot, stored_name

REPO = Path(__file__).resolve().parents[1]


# --- the cutoff on a hand-made split -------------------------------------------------------------------------------


def _split(rows: list[tuple[str, str, float, bool, int]]) -> Split:
    """A Split whose train part is rows (user_id, item_id, label, sampled, _seq), in the given (time) order."""
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "sampled", "_seq"])
    train.insert(2, "scenario", "a")
    train["label"] = train["label"].astype(np.float32)
    empty = train.iloc[:0].copy()
    return Split(train=train, valid=empty, test=empty.copy(), config=SplitConfig(), dataset_fingerprint="hand")


def _implicit_with_negatives() -> Split:
    rows = []
    # u1: 4 observed positives, 2 sampled negatives after each (same _seq as their positive)
    for seq in range(4):
        rows.append(("u1", f"p{seq}", 1.0, False, seq))
        rows += [("u1", f"n{seq}a", 0.0, True, seq), ("u1", f"n{seq}b", 0.0, True, seq)]
    rows += [("u2", "q0", 1.0, False, 10), ("u2", "m0", 0.0, True, 10)]  # 1 observed row: no early history
    rows += [("u3", "r0", 1.0, False, 20), ("u3", "k0", 0.0, True, 20)]  # 2 observed rows: the first is early
    rows += [("u3", "r1", 1.0, False, 21), ("u3", "k1", 0.0, True, 21)]
    return _split(rows)


def test_early_mask_with_sampled_negatives_and_short_users():
    split = _implicit_with_negatives()
    # u1: floor(0.7 * 4) = 2 observed rows early, with their 4 negatives; u2: floor(0.7) = 0; u3: floor(1.4) = 1
    want = [True] * 6 + [False] * 6 + [False, False] + [True, True, False, False]
    assert early_train_mask(split, 0.7).tolist() == want
    # share 0.5: u1 still 2 rows, u2 none, u3 floor(1.0) = 1
    assert early_train_mask(split, 0.5).tolist() == want
    # share 0.8: u1 floor(3.2) = 3 observed rows (9 rows), u3 floor(1.6) = 1
    assert early_train_mask(split, 0.8).tolist() == [True] * 9 + [False] * 3 + [False, False, True, True, False, False]
    history = fit_history(split, 0.7)
    assert history["item_id"].tolist() == ["p0", "p1", "r0"]
    assert list(history.columns) == list(split.train_positives().columns)


def test_early_mask_on_ratings_counts_observed_negatives():
    # Explicit ratings: a disliked (label 0) observed row is an observed row; it is never shown in a prompt.
    labels = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    split = _split([("u", f"i{n}", lab, False, n) for n, lab in enumerate(labels)])
    # floor(0.7 * 7) = 4 observed rows early (two of them positives); floor(0.57 * 100) would be 56 naively
    assert early_train_mask(split, 0.7).tolist() == [True] * 4 + [False] * 3
    assert fit_history(split, 0.7)["item_id"].tolist() == ["i0", "i2"]
    hundred = _split([("u", f"i{n}", 1.0, False, n) for n in range(100)])
    assert int(early_train_mask(hundred, 0.57).sum()) == 57


@pytest.mark.parametrize("share", [0, 1, -0.2, 1.5, math.nan])
def test_share_outside_the_open_interval_is_refused(share):
    with pytest.raises(UserFacingError, match=f"got {share}"):
        early_train_mask(_implicit_with_negatives(), share)


def test_cutoff_on_a_real_split(synth_dir):
    split = make_split(read_dataset(synth_dir), SplitConfig())
    train = split.train
    early = early_train_mask(split, DEFAULT_FIT_SHARE)
    observed = train[~train["sampled"]]
    per_user = pd.DataFrame({"user": observed["user_id"], "early": early[observed.index]}).groupby("user")["early"]
    assert (per_user.sum() == np.floor(DEFAULT_FIT_SHARE * per_user.size() + 1e-9)).all()
    for _, rows in per_user:  # early rows are a prefix of the user's observed rows
        flags = rows.to_numpy()
        assert not (flags[1:] & ~flags[:-1]).any()
    history = fit_history(split, DEFAULT_FIT_SHARE)
    assert 0 < len(history) < len(split.train_positives())
    assert set(history.index) <= set(split.train_positives().index)


# --- the build -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth120(tmp_path_factory) -> Path:
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    out = tmp_path_factory.mktemp("synth120") / "data"
    write_dataset(generate(SynthConfig(users=120, items_per_scenario=40, main_impressions=12, side_impressions=4)), out)
    return out


def _prompts(version_dir: Path, table: str) -> dict[str, str]:
    rows = pq.read_table(version_dir / PROMPTS_FILE).to_pandas()
    rows = rows[rows.level == stored_name(table)]
    return dict(zip(rows.id, rows.prompt, strict=True))


def _history_line(item) -> str:
    """The line a user prompt shows for an item (offline/knowledge/prompts.py)."""
    category = P.USER_ITEM_CATEGORY.format(category=item.category.strip()) if item.category.strip() else ""
    return P.USER_ITEM_LINE.format(title=" ".join(item.title.split()), category=category)


def test_fit_prompts_never_show_a_late_item(synth_dir, tiny_model, tmp_path):  # noqa: F811
    result = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model))
    snap = KnowledgeSnapshot(result.path)
    assert snap.has_fit_vectors and snap.manifest.fit_share == DEFAULT_FIT_SHARE
    fit, serve = _prompts(result.path, USER_FIT), _prompts(result.path, "user")
    assert sorted(fit) == sorted(serve) == snap.fit_users().ids == snap.users().ids

    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    line = {item.item_id: _history_line(item) for item in dataset.items.itertuples(index=False)}
    train, early = split.train, early_train_mask(split, DEFAULT_FIT_SHARE)
    late_shown_in_serve = 0
    for user, rows in train.assign(early=early)[train["label"] > 0.5].groupby("user_id"):
        early_lines = {line[i] for i in rows.item_id[rows.early]}
        for item in rows.item_id[~rows.early]:
            if line[item] in early_lines:
                continue
            assert line[item] not in fit[user], f"late train item {item} of {user} is in its fit prompt"
            late_shown_in_serve += line[item] in serve[user]
        # The scenario headers count the early positives only.
        for scenario in dataset.scenario_names:
            k = int((rows.early & (rows.scenario == scenario)).sum())
            header = P.USER_SCENARIO_HEADER.format(scenario=scenario, count=k)
            assert (header if k else P.USER_NO_HISTORY.format(scenario=scenario)) in fit[user]
    assert late_shown_in_serve > 50  # the serve prompts do show late items: the check above could fail
    assert sum(fit[u] != serve[u] for u in fit) > len(fit) // 2


def test_fit_share_0_writes_no_fit_table_and_serve_side_is_unchanged(synth_dir, tiny_model, tmp_path):  # noqa: F811
    on = run_build(knowledge_config(synth_dir, tmp_path / "on", tiny_model, fit_share=0.6))
    off = run_build(knowledge_config(synth_dir, tmp_path / "off", tiny_model, fit_share=0))
    a, b = KnowledgeSnapshot(on.path), KnowledgeSnapshot(off.path)
    # Off: the old protocol's snapshot, no fit table, and a reader that asks for one is told how to get it.
    assert not b.has_fit_vectors and b.manifest.fit_share is None and b.manifest.fit_counts is None
    assert not (off.path / f"{stored_name(USER_FIT)}.parquet").exists()
    with pytest.raises(UserFacingError, match="--fit-share"):
        b.table(USER_FIT)
    assert "users_fit" not in off.summary() and "computed serve users/s" in off.summary()
    # On: the fit table is recorded; the space (model, template, pooling, mode) is the same.
    assert a.manifest.fit_share == 0.6 and a.manifest.fit_counts.count == len(a.users().ids)
    assert f"users_fit {len(a.users().ids)} ({len(a.users().ids)} computed, 0 reused" in on.summary()
    assert a.space.id == b.space.id and a.space == b.space
    # The serve side is byte-identical: prompts, hashes, vectors, the cold-start vector, every other level.
    assert _prompts(on.path, "user") == _prompts(off.path, "user")
    for level in ("scenario", "user", "item"):
        ta, tb = a.table(level), b.table(level)
        assert ta.ids == tb.ids and ta.prompt_sha256 == tb.prompt_sha256
        assert np.array_equal(ta.embeddings, tb.embeddings)
    assert np.array_equal(a.default_user(), b.default_user())
    assert not np.allclose(a.fit_users().embeddings, a.users().embeddings, atol=1e-4)
    assert set(on.manifest.truncated) == set(off.manifest.truncated) | {"user_fit_embed"}


def test_generate_mode_answers_the_fit_prompts(synth_dir, tiny_model, tmp_path):  # noqa: F811
    from offline.knowledge.backends import make_backend

    cfg = knowledge_config(synth_dir, tmp_path / "kn", tiny_model, mode="generate", reduce_dim=8)
    result = run_build(cfg)
    snap = KnowledgeSnapshot(result.path)
    fit = snap.fit_users()
    assert sum(bool(r) for r in fit.responses) > len(fit.ids) // 2, fit.responses[:5]
    assert fit.dim == snap.users().dim == 8  # reduced with the build's reducer
    assert {"user_fit_generate_per_s", "user_fit_embed_per_s"} <= set(snap.manifest.extra["rates"])
    # What was embedded is the fit prompt followed by its answer, reduced like every other vector.
    from offline.knowledge.build_reduce import apply_reducer

    prompts = _prompts(result.path, USER_FIT)
    users = fit.ids[:3]
    backend = make_backend(cfg.backend)
    try:
        answers = backend.generate([prompts[u] for u in users])
        raw = backend.embed([prompts[u] + " " + a for u, a in zip(users, answers, strict=True)], "mean")
    finally:
        backend.close()
    assert answers == [fit.response_of(u) for u in users]
    reduced = apply_reducer(raw, *KnowledgeSnapshot(result.path).reducer())
    assert np.allclose(reduced, fit.lookup(users)[0], atol=1e-4)

    show = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "show", str(result.path), "--user", users[0], "--fit"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert prompts[users[0]] in show.stdout and fit.response_of(users[0]) in show.stdout
    assert "fit share 0.7" in show.stdout


def test_incremental_reuse_covers_the_fit_table(synth120, tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "kn"
    # A parent without fit vectors lends its serve vectors; the fit vectors are all computed.
    run_build(knowledge_config(synth120, out, tiny_model, fit_share=0))
    counts: dict = {}
    cfg = knowledge_config(synth120, out, tiny_model)
    first = run_build(cfg, executor_factory=lambda: counting_executor(cfg.backend, counts))
    n = len(KnowledgeSnapshot(first.path).users().ids)
    assert first.manifest.computed["user"] == 0 and first.manifest.fit_counts.computed == n
    assert counts == {"embed": n}

    data2 = tmp_path / "data2"
    shutil.copytree(synth120, data2)
    inter = pd.read_csv(data2 / "interactions.csv", dtype=str, keep_default_na=False)
    split = make_split(read_dataset(synth120), SplitConfig())
    users = sorted(inter.user_id.unique())
    # Changes both prompts of users[0]: its oldest click goes. Changes only the serve prompt of users[1]: its newest
    # train click becomes a non-click (a late row: the early rows and the split's boundaries stay as they were).
    drop = inter.index[(inter.user_id == users[0]) & (inter.label == "1")][0]
    late = split.train_positives()[split.train_positives().user_id == users[1]]["_seq"].iloc[-1]
    assert not early_train_mask(split, DEFAULT_FIT_SHARE)[split.train["_seq"].to_numpy() == late].any()
    inter.loc[late, "label"] = "0"
    inter.drop(index=drop).to_csv(data2 / "interactions.csv", index=False)

    counts.clear()
    cfg2 = replace(cfg, data=str(data2))
    second = run_build(cfg2, executor_factory=lambda: counting_executor(cfg2.backend, counts))
    m = second.manifest
    assert m.parent_version == first.manifest.version
    assert m.computed == {"scenario": 0, "user": 2, "item": 0}
    assert (m.fit_counts.computed, m.fit_counts.reused) == (1, n - 1)
    assert counts == {"embed": 3}
    parent, child = KnowledgeSnapshot(first.path), KnowledgeSnapshot(second.path)
    kept = users[1:]
    assert np.array_equal(child.fit_users().lookup(kept)[0], parent.fit_users().lookup(kept)[0])
    assert not np.allclose(child.fit_users().lookup(users[:1])[0], parent.fit_users().lookup(users[:1])[0], atol=1e-4)
    # The recomputed fit vector is what a full build gives.
    full = KnowledgeSnapshot(run_build(replace(cfg2, out=str(tmp_path / "full"))).path)
    assert np.allclose(child.fit_users().embeddings, full.fit_users().embeddings, atol=1e-5)


def test_kill_9_in_the_fit_phase_then_resume(synth_dir, tiny_model, tmp_path):  # noqa: F811
    from llm4msr_cli import build_parser
    from offline.knowledge.cli import config_from_args

    out = tmp_path / "killed"
    argv = ["knowledge", "build", "--data", str(synth_dir), "--model", str(tiny_model), "--dtype", "float32"]
    argv += ["--shard-size", "4", "--no-progress"]  # encode mode: the kill lands in the fit table's embedding
    finished_before = kill_build_after_shards(argv, out, "users_fit-emb-*.parquet")
    assert {n for n in finished_before if n.startswith("users_fit-emb-")}
    assert not {n for n in finished_before if n.startswith("items-emb-")}, "killed after the fit phase"

    recomputed = []
    args = build_parser().parse_args([*argv, "--out", str(out)])
    resumed = run_build(
        config_from_args(args), on_shard=lambda t, ph, k: recomputed.append(f"{stored_name(t)}-{ph}-{k:05d}.parquet")
    )
    assert recomputed and not finished_before & set(recomputed), "finished shards were recomputed"
    assert any(name.startswith("users_fit-emb-") for name in recomputed)  # the fit phase really resumed

    args = build_parser().parse_args([*argv, "--out", str(tmp_path / "clean")])
    a, b = KnowledgeSnapshot(resumed.path), KnowledgeSnapshot(run_build(config_from_args(args)).path)
    assert a.manifest.fit_counts == b.manifest.fit_counts and a.manifest.truncated == b.manifest.truncated
    for table in ("user", USER_FIT):
        ta, tb = a.table(table), b.table(table)
        assert ta.ids == tb.ids and ta.responses == tb.responses
        assert np.array_equal(ta.embeddings, tb.embeddings)


def test_bad_fit_share_is_one_clear_error(synth_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "build", "--data", str(synth_dir), "--out", str(tmp_path)]
        + ["--fit-share", "1.0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "--fit-share must be 0 (no fit user vectors) or in (0, 1), got 1.0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_publish_sends_the_serve_vectors_only(synth_dir, tiny_model, tmp_path, redis_server):  # noqa: F811
    """Fit vectors are training-only: a published version holds the three levels, users with their serve vectors."""
    from offline.knowledge.publish import publish_snapshot
    from shared.knowledge import keys as K
    from shared.knowledge.vector_codec import FLOAT32

    snap = KnowledgeSnapshot(run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model)).path)
    assert snap.has_fit_vectors
    version = publish_snapshot(snap.path, redis_server.url, vector_format=FLOAT32)
    r = redis_server.client()
    names = [k.decode() for k in r.scan_iter(match=f"{K.PREFIX}:{version}:*")]
    assert not [n for n in names if "fit" in n], names[:5]
    users = snap.users().ids
    assert sum(n.startswith(f"{K.PREFIX}:{version}:u:") for n in names) == len(users)
    published = json.loads(r.get(K.meta_key(version)))[K.PUBLISHED]
    assert published["counts"] == {
        "scenarios": len(snap.scenarios().ids),
        "users": len(users),
        "items": len(snap.items().ids),
    }
    for user in users[:20]:
        vec = K.decode_vector(r.get(K.user_key(version, user)))
        assert np.array_equal(vec, snap.users().lookup([user])[0][0])
        assert not np.allclose(vec, snap.fit_users().lookup([user])[0][0], atol=1e-4)
