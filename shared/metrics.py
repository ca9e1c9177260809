"""CTR metrics: AUC, Logloss and GAUC (impression-weighted per-user AUC), overall and per scenario."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based AUC (ties count half); NaN when only one class is present."""
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def gauc(users: Sequence[str] | np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class only are skipped."""
    frame = pd.DataFrame({"u": np.asarray(users), "y": np.asarray(labels) > 0.5, "s": np.asarray(scores)})
    frame["r"] = frame.groupby("u")["s"].rank(method="average")
    g = frame.groupby("u")
    n = g.size()
    n_pos = g["y"].sum()
    n_neg = n - n_pos
    rank_pos = frame[frame["y"]].groupby("u")["r"].sum().reindex(n.index, fill_value=0.0)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_user = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_user, weights=n[ok]))


def summarize(frame: pd.DataFrame, probs: np.ndarray) -> dict:
    """{"overall": {...}, "per_scenario": {scenario: {...}}} for a frame with user_id, scenario, label."""

    def block(mask: np.ndarray) -> dict:
        y = frame["label"].to_numpy()[mask]
        p = probs[mask]
        return {
            "auc": auc(y, p),
            "logloss": logloss(y, p),
            "gauc": gauc(frame["user_id"].to_numpy()[mask], y, p),
            "rows": int(mask.sum()),
            "positive_rate": float(np.mean(y)) if len(y) else float("nan"),
        }

    everything = np.ones(len(frame), dtype=bool)
    scen = frame["scenario"].astype(str).to_numpy()
    return {
        "overall": block(everything),
        "per_scenario": {s: block(scen == s) for s in sorted(pd.unique(scen))},
    }
