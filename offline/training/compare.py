"""`llm4msr compare`: every backbone plain, with LLM4MSR (paper levels, + item level) and with both controls,
over seeds, on one split and one knowledge snapshot. Each finished run is saved as JSON in <out>/runs/, so the
comparison can be run in pieces (per backbone / variant / seed) and resumed; the report is rebuilt from all runs.

Model selection uses the validation split only (early stopping); test numbers are reported, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def run_compare(args: argparse.Namespace, seeds: list[int], make_config) -> None:
    from offline.common import load_split, split_config_from_args
    from offline.training.trainer import train
    from shared.knowledge.snapshot import KnowledgeSnapshot

    variants = args.variants or DEFAULT_VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserFacingError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    snapshot = KnowledgeSnapshot(args.knowledge)
    if not args.report_only:
        dataset, split = load_split(args.data, split_config_from_args(args))
        for seed in seeds:
            for backbone in args.backbones:
                for variant in variants:
                    file = runs_dir / f"{backbone}__{variant}__s{seed}.json"
                    if file.exists():
                        log.info("skip %s (done)", file.name)
                        continue
                    wrapped, source, levels = VARIANTS[variant]
                    cfg = make_config(
                        args,
                        backbone=backbone,
                        llm4msr=wrapped,
                        knowledge_source=source,
                        levels=levels or ["scenario", "user"],
                        seed=seed,
                    )
                    log.info("run %s / %s / seed %d", backbone, variant, seed)
                    result = train(dataset, split, snapshot, cfg)
                    record = {
                        "backbone": backbone,
                        "variant": variant,
                        "seed": seed,
                        "metrics": result.metrics,
                        "best_epoch": result.best_epoch,
                        "seconds": result.seconds,
                        "history": result.history,
                        "config": cfg.to_dict(),
                        "split_fingerprint": split.fingerprint(),
                        "knowledge_version": snapshot.version,
                        "knowledge_space_id": snapshot.space.id,
                    }
                    tmp = file.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    tmp.replace(file)
                    log.info(
                        "%s / %s / seed %d: test AUC %.4f (%.0fs)",
                        backbone,
                        variant,
                        seed,
                        result.metrics["test"]["overall"]["auc"],
                        result.seconds,
                    )
    write_report(out, snapshot)


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


def write_report(out: Path, snapshot) -> Path:
    runs = load_runs(out)
    if not runs:
        raise UserFacingError(f"no finished runs in {out / 'runs'}")
    table = aggregate(runs)
    scenarios = sorted({s for r in runs for s in r["metrics"]["test"]["per_scenario"]})
    backbones = [b for b in ("shared_bottom", "mmoe", "ple", "star") if any(k[0] == b for k in table)]
    variants = [v for v in VARIANTS if any(k[1] == v for k in table)]
    lines = [
        f"# LLM4MSR comparison: {out.name}",
        "",
        f"Knowledge snapshot {snapshot.version} (space {snapshot.space.id}, model {snapshot.space.model}, "
        f"mode {snapshot.space.mode}, pooling {snapshot.space.pooling}, dim {snapshot.space.dim}). "
        "Early stopping on validation AUC; test split untouched by model selection. Mean ± std over seeds.",
        "",
        "## Test AUC",
        "",
        "| backbone | variant | seeds | overall | " + " | ".join(scenarios) + " | GAUC | Logloss | s/run |",
        "|---|---|---|---|" + "---|" * len(scenarios) + "---|---|---|",
    ]
    for b in backbones:
        for v in variants:
            e = table.get((b, v))
            if e is None:
                continue
            cells = [_ms(e.get(f"test/{s}/auc", [])) for s in scenarios]
            lines.append(
                f"| {b} | {LABELS[v]} | {e['n']} | {_ms(e['test/overall/auc'])} | "
                + " | ".join(cells)
                + f" | {_ms(e['test/overall/gauc'])} | {_ms(e['test/overall/logloss'])} | {np.mean(e['seconds']):.0f} |"
            )
    lines += ["", "## Validation AUC (model selection)", "", "| backbone | variant | overall |", "|---|---|---|"]
    for b in backbones:
        for v in variants:
            e = table.get((b, v))
            if e is not None:
                lines.append(f"| {b} | {LABELS[v]} | {_ms(e['valid/overall/auc'])} |")
    lines += [
        "",
        "## Gain over plain (test AUC, mean difference)",
        "",
        "| backbone | variant | overall | " + " | ".join(scenarios) + " |",
        "|---|---|---|" + "---|" * len(scenarios),
    ]
    for b in backbones:
        base = table.get((b, "plain"))
        if base is None:
            continue
        for v in variants:
            e = table.get((b, v))
            if e is None or v == "plain":
                continue
            diffs = [np.mean(e[f"test/{k}/auc"]) - np.mean(base[f"test/{k}/auc"]) for k in ["overall", *scenarios]]
            lines.append(f"| {b} | {LABELS[v]} | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")
    lines += ["", "![per-scenario AUC](per_scenario_auc.png)", "", "![scenario knowledge](scenario_similarity.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({f"{b}/{v}": e for (b, v), e in table.items()}, indent=1))
    _plot_auc(out, table, backbones, variants, scenarios)
    _plot_similarity(out, snapshot)
    log.info("report written to %s", report)
    return report


def _plot_auc(out: Path, table: dict, backbones: list[str], variants: list[str], scenarios: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *scenarios]
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
                vals = table.get((b, v), {}).get(f"test/{panel}/auc", [])
                means.append(np.mean(vals) if vals else np.nan)
                errs.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            if np.isfinite(means).any():
                lo = min(lo, np.nanmin(means))
            x = np.arange(len(backbones)) + (j - (len(variants) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, label=LABELS[v], capsize=2)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        ax.set_ylim(max(0.0, lo - 0.03), None)
        ax.set_title(f"test AUC: {panel}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "per_scenario_auc.png", dpi=110)
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
