"""Descriptive statistics of a dataset folder (`llm4msr data stats`)."""

from __future__ import annotations

from itertools import combinations

from shared.dataset.folder import Dataset


def dataset_stats(dataset: Dataset) -> dict:
    inter = dataset.interactions
    per_user_scenarios = inter.groupby("scenario")["user_id"].unique().map(set)
    scenarios = {}
    for name in dataset.scenario_names:
        rows = inter[inter["scenario"] == name]
        entry = {
            "users": int(rows["user_id"].nunique()),
            "items": int(rows["item_id"].nunique()),
            "interactions": len(rows),
        }
        if dataset.has_labels:
            entry["positive_rate"] = round(float(rows["label"].mean()), 4) if len(rows) else None
        if dataset.has_ratings:
            entry["mean_rating"] = round(float(rows["rating"].mean()), 4) if len(rows) else None
        scenarios[name] = entry
    overlap = {}
    for a, b in combinations(dataset.scenario_names, 2):
        overlap[f"{a}&{b}"] = len(per_user_scenarios.get(a, set()) & per_user_scenarios.get(b, set()))
    user_scenario_counts = inter.groupby("user_id")["scenario"].nunique()
    n_users = int(inter["user_id"].nunique())
    return {
        "name": dataset.name,
        "users": n_users,
        "items": len(dataset.items),
        "interacted_items": int(inter["item_id"].nunique()),
        "interactions": len(inter),
        "scenarios": len(dataset.scenario_names),
        "feedback": "label" if dataset.has_labels else "rating" if dataset.has_ratings else "implicit",
        "timestamps": dataset.has_timestamps,
        "extra_columns": dataset.extra_columns,
        "per_scenario": scenarios,
        "user_overlap": overlap,
        "users_in_all_scenarios": int((user_scenario_counts == len(dataset.scenario_names)).sum()),
        "users_in_several_scenarios": int((user_scenario_counts > 1).sum()),
        "interactions_per_user_median": float(inter.groupby("user_id").size().median()) if n_users else 0.0,
        "fingerprint": dataset.fingerprint(),
    }


def format_stats(stats: dict) -> str:
    lines = [
        f"dataset {stats['name']}: {stats['users']:,} users, {stats['items']:,} items "
        f"({stats['interacted_items']:,} interacted), {stats['interactions']:,} interactions, "
        f"{stats['scenarios']} scenarios, feedback={stats['feedback']}, timestamps={stats['timestamps']}",
        f"{'scenario':<24}{'users':>10}{'items':>10}{'interactions':>14}",
    ]
    for name, s in stats["per_scenario"].items():
        lines.append(f"{name:<24}{s['users']:>10,}{s['items']:>10,}{s['interactions']:>14,}")
    lines.append(
        f"users active in several scenarios: {stats['users_in_several_scenarios']:,}; "
        f"in all: {stats['users_in_all_scenarios']:,}"
    )
    for pair, n in stats["user_overlap"].items():
        lines.append(f"  overlap {pair}: {n:,} users")
    return "\n".join(lines)
