"""Top-K ranking metrics (Recall@K, NDCG@K, MRR@K per user, ranked by score) against hand-computed values."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from offline.training.metrics import DEFAULT_TOP_K, ranking_metrics, summarize

L3 = 1 / np.log2(3)  # the discount of rank 2

# (user, score, label) in row order. Ranked by score; among ties negatives first (pessimistic), then row order:
#   a: r0 0.9 neg, r2 0.7 neg, r1 0.7 POS (tie: negative first), r4 0.5 neg, r3 0.2 POS -> positives at ranks 3, 5
#   b: r5 0.4 neg, r6 0.4 POS (tie: r5 is earlier), r7 0.1 neg                          -> positive at rank 2
#   c: positives only, d: a negative only                                                 -> not counted
#   e: r11 0.8 POS, r13 0.6 POS, r12 0.3 neg                                              -> positives at ranks 1, 2
ROWS = [
    ("a", 0.9, 0),
    ("a", 0.7, 1),
    ("a", 0.7, 0),
    ("a", 0.2, 1),
    ("a", 0.5, 0),
    ("b", 0.4, 0),
    ("b", 0.4, 1),
    ("b", 0.1, 0),
    ("c", 0.3, 1),
    ("c", 0.6, 1),
    ("d", 0.5, 0),
    ("e", 0.8, 1),
    ("e", 0.3, 0),
    ("e", 0.6, 1),
]


def _columns(rows):
    users, scores, labels = zip(*rows)
    return np.array(users), np.array(labels), np.array(scores)


def test_hand_computed_example():
    got = ranking_metrics(*_columns(ROWS), ks=(1, 3))
    # K=1: only e has a positive on top: recall 1/2, NDCG 1, MRR 1.
    # K=3: a finds 1 of 2 (rank 3): NDCG 0.5 / (1 + L3), MRR 1/3; b: recall 1, NDCG L3, MRR 1/2; e: all 1.
    expected = {
        "recall@1": (0 + 0 + 0.5) / 3,
        "ndcg@1": (0 + 0 + 1) / 3,
        "mrr@1": (0 + 0 + 1) / 3,
        "recall@3": (0.5 + 1 + 1) / 3,
        "ndcg@3": (0.5 / (1 + L3) + L3 + 1) / 3,
        "mrr@3": (1 / 3 + 0.5 + 1) / 3,
        "topk_users": 3,
    }
    assert got == pytest.approx(expected, rel=1e-12)


def test_tied_positives_rank_after_tied_negatives_whatever_the_row_order():
    rows = list(ROWS)
    rows[5], rows[6] = rows[6], rows[5]  # b's tied positive now comes first in the file: still rank 2
    assert ranking_metrics(*_columns(rows), ks=(1, 3)) == ranking_metrics(*_columns(ROWS), ks=(1, 3))
    # a model that scores every row alike ranks each user's positives last
    users, labels, _ = _columns(ROWS)
    flat = ranking_metrics(users, labels, np.full(len(labels), 0.5), ks=(1,))
    assert flat["recall@1"] == 0 and flat["mrr@1"] == 0


def test_no_ranked_user_gives_nan():
    got = ranking_metrics(["a", "a", "b"], np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), ks=(5,))
    assert got["topk_users"] == 0 and np.isnan(got["ndcg@5"]) and np.isnan(got["recall@5"])


def _reference(users, labels, scores, ks) -> dict:
    """The definitions, one user at a time (slow, obvious)."""
    per_user = {f"{m}@{k}": [] for m in ("recall", "ndcg", "mrr") for k in ks}
    for u in dict.fromkeys(users):
        idx = [i for i in range(len(users)) if users[i] == u]
        ranked = sorted(idx, key=lambda i: (-scores[i], labels[i] > 0.5, i))
        rel = [labels[i] > 0.5 for i in ranked]
        n_pos = sum(rel)
        if n_pos == 0 or n_pos == len(rel):
            continue
        first = rel.index(True) + 1
        for k in ks:
            per_user[f"recall@{k}"].append(sum(rel[:k]) / n_pos)
            dcg = sum(1 / np.log2(r + 2) for r, hit in enumerate(rel[:k]) if hit)
            per_user[f"ndcg@{k}"].append(dcg / sum(1 / np.log2(r + 2) for r in range(min(n_pos, k))))
            per_user[f"mrr@{k}"].append(1 / first if first <= k else 0.0)
    return {name: float(np.mean(v)) for name, v in per_user.items()}


def test_vectorised_equals_the_per_user_definition():
    rng = np.random.default_rng(4)
    n = 3000
    users = rng.integers(0, 150, n).astype(str)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = rng.integers(0, 8, n) / 8.0  # many ties
    got = ranking_metrics(users, labels, scores, ks=(1, 5, 10, 20))
    want = _reference(users.tolist(), labels, scores, (1, 5, 10, 20))
    assert {k: v for k, v in got.items() if k != "topk_users"} == pytest.approx(want, rel=1e-9)


def test_summarize_keeps_its_keys_and_ranks_overall_across_scenarios():
    frame = pd.DataFrame(
        {"user_id": ["a", "a", "a", "a"], "scenario": ["s1", "s1", "s2", "s2"], "label": [1.0, 0.0, 0.0, 1.0]}
    )
    probs = np.array([0.9, 0.1, 0.8, 0.2], dtype=np.float32)
    m = summarize(frame, probs, top_k=(1, 2))
    for block in (m["overall"], *m["per_scenario"].values()):
        assert {"auc", "gauc", "logloss", "rows", "positive_rate", "topk_users"} <= set(block)
    assert m["per_scenario"]["s1"]["ndcg@1"] == 1.0 and m["per_scenario"]["s2"]["ndcg@1"] == 0.0
    # Overall: 0.9 POS, 0.8 neg, 0.2 POS, 0.1 neg.
    assert m["overall"]["recall@1"] == 0.5 and m["overall"]["mrr@2"] == 1.0
    assert m["overall"]["ndcg@2"] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert set(summarize(frame, probs)["overall"]) >= {f"ndcg@{k}" for k in DEFAULT_TOP_K}


def test_100k_rows_over_10k_users_take_well_under_a_second():
    rng = np.random.default_rng(0)
    n = 100_000
    users = np.array([f"u{x:05d}" for x in rng.integers(0, 10_000, n)], dtype=object)
    labels, scores = rng.random(n) < 0.2, rng.random(n).astype(np.float32)
    ranking_metrics(users[:1000], labels[:1000], scores[:1000])  # warm-up
    t0 = time.perf_counter()
    got = ranking_metrics(users, labels, scores)
    # ~0.1 s here; a Python loop over the users takes seconds. Generous for a shared 2-core machine.
    assert time.perf_counter() - t0 < 1.5
    assert got["topk_users"] > 8000
