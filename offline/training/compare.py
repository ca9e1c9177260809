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

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from offline.data.split import SplitConfig
from offline.training.config import TrainConfig
from offline.training.metrics import DEFAULT_TOP_K
from shared.errors import UserFacingError, unknown_name
from shared.models.backbones import backbone_names

if TYPE_CHECKING:
    from offline.data.split import Split
    from offline.training.trainer import TrainResult
    from shared.dataset.folder import Dataset
    from shared.knowledge.snapshot import KnowledgeSnapshot

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


def run_settings(config: dict, split_fingerprint: str, snapshot: KnowledgeSnapshot, top_k: list[int]) -> dict:
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


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: which runs (backbones x variants x seeds) on which data, knowledge and training settings."""

    data: str
    knowledge: str
    out: str
    # Shared by every run; each run sets its backbone, its variant's llm4msr/knowledge_source/levels and its seed.
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    backbones: tuple[str, ...] = field(default_factory=lambda: tuple(backbone_names()))
    variants: tuple[str, ...] = tuple(DEFAULT_VARIANTS)
    top_k: tuple[int, ...] = tuple(DEFAULT_TOP_K)
    report_only: bool = False  # only rebuild the report from the finished runs made with these settings

    def __post_init__(self) -> None:
        for kind, names, known in (
            ("variant", self.variants, VARIANTS),
            ("backbone", self.backbones, backbone_names()),
        ):
            for name in names:
                if name not in known:
                    raise unknown_name(kind, name, known)

    def run_config(self, backbone: str, variant: str, seed: int) -> TrainConfig:
        wrapped, source, levels = VARIANTS[variant]
        return self.train.with_values(
            backbone=backbone,
            llm4msr=wrapped,
            knowledge_source=source,
            levels=levels or ["scenario", "user"],
            seed=seed,
        )


def evaluate_run(result: TrainResult, split: Split, snapshot: KnowledgeSnapshot, top_k: list[int]) -> dict:
    """Valid and test metrics of a trained run through the serving/evaluate scoring path, with the top-K list."""
    from offline.training.metrics import summarize
    from shared.artifact import in_memory_artifact
    from shared.scoring import RequestScorer, SnapshotLookup

    scorer = RequestScorer(in_memory_artifact(result.model, result.encoder, result.artifact_fields(split)))
    lookup = SnapshotLookup(snapshot) if scorer.needs_levels else None
    frames = {"valid": split.valid, "test": split.test}
    return {name: summarize(f, scorer.score_rows(f, lookup), top_k) for name, f in frames.items() if len(f)}


def run_compare(config: CompareConfig) -> None:
    """Trains the runs that have no finished record made with the same settings, then writes the report."""
    from offline.common import load_split
    from shared.knowledge.snapshot import KnowledgeSnapshot

    out = Path(config.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    snapshot = KnowledgeSnapshot(config.knowledge)
    dataset, split = load_split(config.data, config.split)
    if not config.report_only:
        for seed in config.seeds:
            for backbone in config.backbones:
                for variant in config.variants:
                    _run_once(config, dataset, split, snapshot, backbone, variant, seed)
    current, left_out = _matching_runs(config, out, split.fingerprint(), snapshot)
    if not current:
        raise UserFacingError(
            f"no finished run in {out / 'runs'} matches these settings ({len(left_out)} made with other settings); "
            "run without --report-only, or pass the options the runs were made with"
        )
    write_report(out, snapshot, current, list(config.top_k), left_out)


def _run_once(
    config: CompareConfig,
    dataset: Dataset,
    split: Split,
    snapshot: KnowledgeSnapshot,
    backbone: str,
    variant: str,
    seed: int,
) -> None:
    """Trains and records one run, unless its record exists and was made with the same settings."""
    from offline.training.trainer import train

    file = Path(config.out) / "runs" / f"{backbone}__{variant}__s{seed}.json"
    cfg = config.run_config(backbone, variant, seed).to_dict()
    settings = run_settings(cfg, split.fingerprint(), snapshot, list(config.top_k))
    if file.exists():
        changed = changed_settings(json.loads(file.read_text()), cfg, settings)
        if not changed:
            log.info("reuse %s (same settings)", file.name)
            return
        log.info("recompute %s: settings changed: %s", file.name, "; ".join(changed))
    log.info("run %s / %s / seed %d", backbone, variant, seed)
    result = train(dataset, split, snapshot, config.run_config(backbone, variant, seed))
    metrics = evaluate_run(result, split, snapshot, list(config.top_k))
    record = {
        "backbone": backbone,
        "variant": variant,
        "seed": seed,
        "metrics": metrics,
        "best_epoch": result.best_epoch,
        "seconds": result.seconds,
        "history": result.history,
        "config": cfg,
        **settings,
    }
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(file)
    auc = metrics["test"]["overall"]["auc"]
    log.info("%s / %s / seed %d: test AUC %.4f (%.0fs)", backbone, variant, seed, auc, result.seconds)


def _matching_runs(
    config: CompareConfig, out: Path, split_fp: str, snapshot: KnowledgeSnapshot
) -> tuple[list[dict], list[str]]:
    """The finished runs made with the current settings, and a line per run left out (with what changed)."""
    current, left_out = [], []
    for run in load_runs(out):
        cfg = config.run_config(run["backbone"], run["variant"], run["seed"]).to_dict()
        changed = changed_settings(run, cfg, run_settings(cfg, split_fp, snapshot, list(config.top_k)))
        if changed:
            name = f"{run['backbone']}__{run['variant']}__s{run['seed']}"
            log.warning("report leaves out %s: made with other settings (%s)", name, "; ".join(changed))
            left_out.append(f"{name} ({'; '.join(changed)})")
        else:
            current.append(run)
    return current, left_out


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


@dataclass(frozen=True)
class ReportTables:
    """The aggregated runs in report order, and the Markdown tables made from them."""

    table: dict[tuple[str, str], dict]  # (backbone, variant) -> aggregate()'s entry
    backbones: list[str]
    variants: list[str]
    panels: list[str]  # "overall", then each scenario

    @classmethod
    def of(cls, runs: list[dict]) -> ReportTables:
        table = aggregate(runs)
        registered = backbone_names()
        order = {b: (registered.index(b) if b in registered else len(registered), b) for b, _ in table}
        scenarios = sorted({s for r in runs for s in r["metrics"]["test"]["per_scenario"]})
        variants = [v for v in VARIANTS if any(k[1] == v for k in table)]
        return cls(table, sorted(order, key=order.__getitem__), variants, ["overall", *scenarios])

    @property
    def rows(self) -> list[tuple[str, str, dict]]:
        """(backbone, variant, entry) per table row."""
        return [(b, v, self.table[(b, v)]) for b in self.backbones for v in self.variants if (b, v) in self.table]

    def users(self, panel: str) -> str:
        counts = {n for _, _, e in self.rows for n in e.get(f"test/{panel}/topk_users", [])}
        return "/".join(str(n) for n in sorted(counts)) or "-"

    def per_panel(self, title: str, metric: str, extra: dict[str, Callable[[dict], str]] | None = None) -> list[str]:
        """One row per (backbone, variant): the metric overall and per scenario, then the extra columns."""
        extra = extra or {}
        lines = [
            "",
            f"## {title}",
            "",
            "| backbone | variant | seeds | " + " | ".join(self.panels) + "".join(f" | {h}" for h in extra) + " |",
            "|---|---|---|" + "---|" * (len(self.panels) + len(extra)),
        ]
        for b, v, e in self.rows:
            cells = [_ms(e.get(f"test/{p}/{metric}", [])) for p in self.panels] + [cell(e) for cell in extra.values()]
            lines.append(f"| {b} | {LABELS[v]} | {e['n']} | " + " | ".join(cells) + " |")
        return lines

    def gains(self, metric: str, title: str) -> list[str]:
        lines = [
            "",
            f"## Gain over plain ({title}, mean difference)",
            "",
            "| backbone | variant | " + " | ".join(self.panels) + " |",
            "|---|---|" + "---|" * len(self.panels),
        ]
        for b, v, e in self.rows:
            base = self.table.get((b, "plain"))
            if base is None or v == "plain":
                continue
            diffs = [
                np.mean(e.get(f"test/{p}/{metric}", np.nan)) - np.mean(base.get(f"test/{p}/{metric}", np.nan))
                for p in self.panels
            ]
            lines.append(f"| {b} | {LABELS[v]} | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")
        return lines


def _overall(metric: str) -> Callable[[dict], str]:
    return lambda e: _ms(e.get(f"test/overall/{metric}", []))


def _report_lines(out: Path, snapshot: KnowledgeSnapshot, tables: ReportTables, top_k: list[int]) -> list[str]:
    """report.md without its left-out list."""
    k = report_k(top_k)
    ndcg = f"ndcg@{k}"
    space = snapshot.space
    lines = [
        f"# LLM4MSR comparison: {out.name}",
        "",
        f"Knowledge snapshot {snapshot.version} (space {space.id}, model {space.model}, mode {space.mode}, "
        f"pooling {space.pooling}, dim {space.dim}). "
        "Early stopping on validation AUC; test split untouched by model selection. Mean ± std over seeds.",
        "",
        "Top-K metrics rank each user's test rows by score (among tied scores negatives rank first), per scenario "
        f"and, for overall, over all the user's scenarios; Recall@{k}, NDCG@{k} and MRR@{k} are means over the users "
        f"with at least one positive and one negative: {', '.join(f'{p} {tables.users(p)}' for p in tables.panels)}. "
        f"summary.json has K = {', '.join(map(str, top_k))}.",
    ]
    seconds = {"s/run": lambda e: f"{np.mean(e['seconds']):.0f}"}
    extra = {f"NDCG@{k} overall": _overall(ndcg), "GAUC": _overall("gauc"), "Logloss": _overall("logloss")}
    lines += tables.per_panel("Test AUC", "auc", extra | seconds)
    lines += tables.per_panel(f"Test NDCG@{k}", ndcg, {f"MRR@{k} overall": _overall(f"mrr@{k}")})
    lines += tables.per_panel(f"Test Recall@{k}", f"recall@{k}")
    lines += ["", "## Validation AUC (model selection)", "", "| backbone | variant | overall |", "|---|---|---|"]
    lines += [f"| {b} | {LABELS[v]} | {_ms(e['valid/overall/auc'])} |" for b, v, e in tables.rows]
    lines += tables.gains("auc", "test AUC")
    lines += tables.gains(ndcg, f"test NDCG@{k}")
    return lines + [
        "",
        "![per-scenario AUC](per_scenario_auc.png)",
        "",
        f"![per-scenario NDCG@{k}](per_scenario_ndcg{k}.png)",
        "",
        "![scenario knowledge](scenario_similarity.png)",
        "",
    ]


def write_report(
    out: Path, snapshot: KnowledgeSnapshot, runs: list[dict], top_k: list[int], left_out: list[str] | None = None
) -> Path:
    """report.md, summary.json and the plots from `runs` (the finished runs that match the current settings)."""
    if not runs:
        raise UserFacingError(f"no finished runs in {out / 'runs'}")
    tables = ReportTables.of(runs)
    lines = _report_lines(out, snapshot, tables, top_k)
    if left_out:
        lines += ["## Left out: finished runs made with other settings", ""]
        lines += [f"- {name}" for name in left_out] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({f"{b}/{v}": e for (b, v), e in tables.table.items()}, indent=1))
    k = report_k(top_k)
    plot_args = (tables.table, tables.backbones, tables.variants, tables.panels)
    _plot_metric(out / "per_scenario_auc.png", *plot_args, "auc", "test AUC")
    _plot_metric(out / f"per_scenario_ndcg{k}.png", *plot_args, f"ndcg@{k}", f"test NDCG@{k}")
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


def _plot_similarity(out: Path, snapshot: KnowledgeSnapshot) -> None:
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
