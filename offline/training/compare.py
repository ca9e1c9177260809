"""`llm4msr compare`: every backbone plain, with LLM4MSR (paper levels, + item level) and with both controls,
over seeds, on one split and one knowledge snapshot. Each finished run is saved as JSON in <out>/runs/, so the
comparison can be run in pieces (per backbone / variant / seed) and resumed.

A finished run is reused only when it was made with the same settings: split fingerprint (data + split options),
knowledge snapshot (version and space), training config hash and top-K list; otherwise it is recomputed, with a log
line naming the run and what changed. The report is built from the runs that match the current settings only, so a
rerun with other epochs, data or knowledge never mixes stale numbers into it (left-out runs are listed).

Each run is scored through shared.scoring, the path of `llm4msr evaluate`, so its numbers are what `evaluate`
prints for the same model. Model selection uses the validation split only (early stopping); test numbers are
reported, never tuned on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.errors import UserFacingError

log = logging.getLogger(__name__)

# name -> (llm4msr, knowledge_source, levels)
VARIANTS: dict[str, tuple[bool, str, list[str]]] = {
    "plain": (False, "llm", []),
    "llm_su": (True, "llm", ["scenario", "user"]),
    "llm_sui": (True, "llm", ["scenario", "user", "item"]),
    "id_sui": (True, "id", ["scenario", "user", "item"]),
    "random_sui": (True, "random", ["scenario", "user", "item"]),
    "id_su": (True, "id", ["scenario", "user"]),
    "random_su": (True, "random", ["scenario", "user"]),
}
DEFAULT_VARIANTS = ["plain", "llm_su", "llm_sui", "id_sui", "random_sui"]
LABELS = {
    "plain": "plain",
    "llm_su": "+LLM4MSR (scenario,user)",
    "llm_sui": "+LLM4MSR (scenario,user,item)",
    "id_sui": "+ID control (s,u,i)",
    "random_sui": "+random control (s,u,i)",
    "id_su": "+ID control (s,u)",
    "random_su": "+random control (s,u)",
}
# TrainConfig fields that do not change what a run computes: never a reason to recompute.
NEUTRAL_CONFIG_KEYS = frozenset({"progress", "threads", "eval_batch_size"})


def config_hash(config: dict) -> str:
    """sha256 of the training config without the neutral fields."""
    kept = {k: v for k, v in config.items() if k not in NEUTRAL_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def run_settings(config: dict, split_fingerprint: str, snapshot, top_k: list[int]) -> dict:
    """What a run's numbers depend on, as stored in its record and compared before reusing it."""
    return {
        "split_fingerprint": split_fingerprint,
        "knowledge_version": snapshot.version,
        "knowledge_space_id": snapshot.space.id,
        "config_hash": config_hash(config),
        "top_k": list(top_k),
    }


def changed_settings(record: dict, config: dict, settings: dict) -> list[str]:
    """Why a finished run does not match the current settings; empty when it can be reused."""
    reasons = []
    if record.get("split_fingerprint") != settings["split_fingerprint"]:
        old = str(record.get("split_fingerprint"))[:12]
        reasons.append(f"split {old} -> {settings['split_fingerprint'][:12]} (data or split options)")
    for key in ("knowledge_version", "knowledge_space_id"):
        if record.get(key) != settings[key]:
            reasons.append(f"{key.replace('_', ' ')} {record.get(key)} -> {settings[key]}")
    old_config = record.get("config") or {}
    if config_hash(old_config) != settings["config_hash"]:
        keys = sorted((set(old_config) | set(config)) - NEUTRAL_CONFIG_KEYS)
        reasons += [
            f"{k} {old_config.get(k)!r} -> {config.get(k)!r}" for k in keys if old_config.get(k) != config.get(k)
        ]
    if record.get("top_k") != settings["top_k"]:
        reasons.append(f"top-k {record.get('top_k')} -> {settings['top_k']}")
    return reasons


def _run_config(args: argparse.Namespace, make_config, backbone: str, variant: str, seed: int):
    wrapped, source, levels = VARIANTS[variant]
    return make_config(
        args,
        backbone=backbone,
        llm4msr=wrapped,
        knowledge_source=source,
        levels=levels or ["scenario", "user"],
        seed=seed,
    )


def evaluate_run(result, split, snapshot, top_k: list[int]) -> dict:
    """Valid and test metrics of a trained run through the serving/evaluate scoring path, with the top-K list."""
    from offline.training.metrics import summarize
    from shared.artifact import in_memory_artifact
    from shared.scoring import RequestScorer, SnapshotLookup

    scorer = RequestScorer(in_memory_artifact(result.model, result.encoder, result.artifact_fields(split)))
    lookup = SnapshotLookup(snapshot) if scorer.needs_levels else None
    frames = {"valid": split.valid, "test": split.test}
    return {name: summarize(f, scorer.score_rows(f, lookup), top_k) for name, f in frames.items() if len(f)}


def run_compare(args: argparse.Namespace, seeds: list[int], make_config) -> None:
    from offline.common import load_split, split_config_from_args
    from offline.training.trainer import train
    from shared.knowledge.snapshot import KnowledgeSnapshot

    variants = args.variants or DEFAULT_VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserFacingError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    top_k = list(args.top_k)
    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    snapshot = KnowledgeSnapshot(args.knowledge)
    dataset, split = load_split(args.data, split_config_from_args(args))
    split_fp = split.fingerprint()
    if not args.report_only:
        for seed in seeds:
            for backbone in args.backbones:
                for variant in variants:
                    file = runs_dir / f"{backbone}__{variant}__s{seed}.json"
                    cfg = _run_config(args, make_config, backbone, variant, seed)
                    settings = run_settings(cfg.to_dict(), split_fp, snapshot, top_k)
                    if file.exists():
                        changed = changed_settings(json.loads(file.read_text()), cfg.to_dict(), settings)
                        if not changed:
                            log.info("reuse %s (same settings)", file.name)
                            continue
                        log.info("recompute %s: settings changed: %s", file.name, "; ".join(changed))
                    log.info("run %s / %s / seed %d", backbone, variant, seed)
                    result = train(dataset, split, snapshot, cfg)
                    metrics = evaluate_run(result, split, snapshot, top_k)
                    record = {
                        "backbone": backbone,
                        "variant": variant,
                        "seed": seed,
                        "metrics": metrics,
                        "best_epoch": result.best_epoch,
                        "seconds": result.seconds,
                        "history": result.history,
                        "config": cfg.to_dict(),
                        **settings,
                    }
                    tmp = file.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    tmp.replace(file)
                    log.info(
                        "%s / %s / seed %d: test AUC %.4f (%.0fs)",
                        backbone,
                        variant,
                        seed,
                        metrics["test"]["overall"]["auc"],
                        result.seconds,
                    )
    current, left_out = [], []
    for run in load_runs(out):
        cfg = _run_config(args, make_config, run["backbone"], run["variant"], run["seed"])
        changed = changed_settings(run, cfg.to_dict(), run_settings(cfg.to_dict(), split_fp, snapshot, top_k))
        if changed:
            name = f"{run['backbone']}__{run['variant']}__s{run['seed']}"
            log.warning("report leaves out %s: made with other settings (%s)", name, "; ".join(changed))
            left_out.append(f"{name} ({'; '.join(changed)})")
        else:
            current.append(run)
    if not current:
        raise UserFacingError(
            f"no finished run in {runs_dir} matches these settings ({len(left_out)} made with other settings); "
            "run without --report-only, or pass the options the runs were made with"
        )
    write_report(out, snapshot, current, top_k, left_out)


def load_runs(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def aggregate(runs: list[dict]) -> dict:
    """(backbone, variant) -> {"n": seeds, metric key -> list of values}."""
    table: dict[tuple[str, str], dict] = {}
    for r in runs:
        key = (r["backbone"], r["variant"])
        entry = table.setdefault(key, {"n": 0, "seeds": []})
        entry["n"] += 1
        entry["seeds"].append(r["seed"])
        for split in ("valid", "test"):
            m = r["metrics"].get(split)
            if not m:
                continue
            for name, val in m["overall"].items():
                entry.setdefault(f"{split}/overall/{name}", []).append(val)
            for scen, block in m["per_scenario"].items():
                for name, val in block.items():
                    entry.setdefault(f"{split}/{scen}/{name}", []).append(val)
        entry.setdefault("seconds", []).append(r["seconds"])
    return table


def report_k(top_k: list[int]) -> int:
    """The K shown in the report's tables and plots: 10 (the papers' choice) when computed, else the nearest."""
    return min(top_k, key=lambda k: (abs(k - 10), k))


def write_report(out: Path, snapshot, runs: list[dict], top_k: list[int], left_out: list[str] | None = None) -> Path:
    """report.md, summary.json and the plots from `runs` (the finished runs that match the current settings)."""
    if not runs:
        raise UserFacingError(f"no finished runs in {out / 'runs'}")
    table = aggregate(runs)
    scenarios = sorted({s for r in runs for s in r["metrics"]["test"]["per_scenario"]})
    backbones = [b for b in ("shared_bottom", "mmoe", "ple", "star") if any(k[0] == b for k in table)]
    variants = [v for v in VARIANTS if any(k[1] == v for k in table)]
    k = report_k(top_k)
    ndcg, recall, mrr = f"ndcg@{k}", f"recall@{k}", f"mrr@{k}"
    rows = [(b, v, table[(b, v)]) for b in backbones for v in variants if (b, v) in table]
    panels = ["overall", *scenarios]

    def users(panel: str) -> str:
        counts = {n for _, _, e in rows for n in e.get(f"test/{panel}/topk_users", [])}
        return "/".join(str(n) for n in sorted(counts)) or "-"

    def overall(metric: str) -> Callable[[dict], str]:
        return lambda e: _ms(e.get(f"test/overall/{metric}", []))

    def per_panel(title: str, metric: str, extra: dict[str, Callable[[dict], str]] | None = None) -> list[str]:
        """One row per (backbone, variant): the metric overall and per scenario, then the extra columns."""
        extra = extra or {}
        lines = [
            "",
            f"## {title}",
            "",
            "| backbone | variant | seeds | " + " | ".join(panels) + "".join(f" | {h}" for h in extra) + " |",
            "|---|---|---|" + "---|" * (len(panels) + len(extra)),
        ]
        for b, v, e in rows:
            cells = [_ms(e.get(f"test/{p}/{metric}", [])) for p in panels] + [cell(e) for cell in extra.values()]
            lines.append(f"| {b} | {LABELS[v]} | {e['n']} | " + " | ".join(cells) + " |")
        return lines

    def gains(metric: str, title: str) -> list[str]:
        lines = [
            "",
            f"## Gain over plain ({title}, mean difference)",
            "",
            "| backbone | variant | " + " | ".join(panels) + " |",
            "|---|---|" + "---|" * len(panels),
        ]
        for b, v, e in rows:
            base = table.get((b, "plain"))
            if base is None or v == "plain":
                continue
            diffs = [
                np.mean(e.get(f"test/{p}/{metric}", np.nan)) - np.mean(base.get(f"test/{p}/{metric}", np.nan))
                for p in panels
            ]
            lines.append(f"| {b} | {LABELS[v]} | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")
        return lines

    lines = [
        f"# LLM4MSR comparison: {out.name}",
        "",
        f"Knowledge snapshot {snapshot.version} (space {snapshot.space.id}, model {snapshot.space.model}, "
        f"mode {snapshot.space.mode}, pooling {snapshot.space.pooling}, dim {snapshot.space.dim}). "
        "Early stopping on validation AUC; test split untouched by model selection. Mean ± std over seeds.",
        "",
        f"Top-K metrics rank each user's test rows by score (among tied scores negatives rank first), per scenario and, for overall, "
        f"over all the user's scenarios; Recall@{k}, NDCG@{k} and MRR@{k} are means over the users with at least one "
        f"positive and one negative: {', '.join(f'{p} {users(p)}' for p in panels)}. summary.json has K = "
        f"{', '.join(map(str, top_k))}.",
    ]
    lines += per_panel(
        "Test AUC",
        "auc",
        {
            f"NDCG@{k} overall": overall(ndcg),
            "GAUC": overall("gauc"),
            "Logloss": overall("logloss"),
            "s/run": lambda e: f"{np.mean(e['seconds']):.0f}",
        },
    )
    lines += per_panel(f"Test NDCG@{k}", ndcg, {f"MRR@{k} overall": overall(mrr)})
    lines += per_panel(f"Test Recall@{k}", recall)
    lines += ["", "## Validation AUC (model selection)", "", "| backbone | variant | overall |", "|---|---|---|"]
    lines += [f"| {b} | {LABELS[v]} | {_ms(e['valid/overall/auc'])} |" for b, v, e in rows]
    lines += gains("auc", "test AUC")
    lines += gains(ndcg, f"test NDCG@{k}")
    lines += [
        "",
        "![per-scenario AUC](per_scenario_auc.png)",
        "",
        f"![per-scenario NDCG@{k}](per_scenario_ndcg{k}.png)",
        "",
        "![scenario knowledge](scenario_similarity.png)",
        "",
    ]
    if left_out:
        lines += ["## Left out: finished runs made with other settings", ""]
        lines += [f"- {name}" for name in left_out] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({f"{b}/{v}": e for (b, v), e in table.items()}, indent=1))
    _plot_metric(out / "per_scenario_auc.png", table, backbones, variants, panels, "auc", "test AUC")
    _plot_metric(out / f"per_scenario_ndcg{k}.png", table, backbones, variants, panels, ndcg, f"test NDCG@{k}")
    _plot_similarity(out, snapshot)
    log.info("report written to %s", report)
    return report


def _plot_metric(
    file: Path, table: dict, backbones: list[str], variants: list[str], panels: list[str], metric: str, title: str
) -> None:
    """Bars per backbone and variant (mean ± std over seeds), one panel for overall and each scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    width = 0.8 / max(1, len(variants))
    for ax, panel in zip(axes.flat, panels):
        lo = 1.0
        for j, v in enumerate(variants):
            means, errs = [], []
            for b in backbones:
                vals = table.get((b, v), {}).get(f"test/{panel}/{metric}", [])
                means.append(np.mean(vals) if vals else np.nan)
                errs.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            if np.isfinite(means).any():
                lo = min(lo, np.nanmin(means))
            x = np.arange(len(backbones)) + (j - (len(variants) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, label=LABELS[v], capsize=2)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        ax.set_ylim(max(0.0, lo - 0.03), None)
        ax.set_title(f"{title}: {panel}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def _plot_similarity(out: Path, snapshot) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = snapshot.scenarios()
    emb = table.embeddings.astype(np.float64)
    # Raw hidden states share a large common direction (cosines near 1), so the second panel centres them on the
    # users' mean vector first, which shows how the scenarios differ relative to the typical prompt.
    try:
        centre = snapshot.users().embeddings.astype(np.float64).mean(0)
    except UserFacingError:
        centre = emb.mean(0)
    panels = {"raw": emb, "centred on the mean user vector": emb - centre}
    n = len(table.ids)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.1 * n + 2.5), 1.1 * n + 2))
    for ax, (title, vecs) in zip(axes, panels.items()):
        unit = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        sim = unit @ unit.T
        im = ax.imshow(sim, vmin=-1.0, vmax=1.0, cmap="coolwarm")
        ax.set_xticks(range(n), table.ids, rotation=30, ha="right")
        ax.set_yticks(range(n), table.ids)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"scenario knowledge cosine: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "scenario_similarity.png", dpi=110)
    plt.close(fig)
