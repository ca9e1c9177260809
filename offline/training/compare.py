"""`llm4msr compare`: every backbone plain, with LLM4MSR and with both controls, over seeds, on one split and one
knowledge snapshot. Each finished run is saved as JSON in <out>/runs/, so the comparison can be run in pieces (per
backbone / variant / seed) and resumed.

Variants (VARIANTS): the default set is affordable (plain, LLM4MSR with --levels auto, the id and random controls);
`--ablations` adds where the gain comes from: each level alone and combined, gated vs ungated, the leak-free vs the
full-history user protocol, mean vs last pooling (a second snapshot, --knowledge-last) and reduce-dim 32 / 128.
Every run's test logloss, expected calibration error and reliability bins are recorded; the report has a
calibration table and a reliability plot.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from offline.data.split import SplitConfig
from offline.training.compare_plots import PlotLayout, plot_metric, plot_reliability, plot_similarity
from offline.training.config import TrainConfig, fill_absent
from offline.training.metrics import CALIBRATION_BINS, DEFAULT_TOP_K
from shared.errors import UserFacingError, unknown_name
from shared.models.backbones import backbone_names, backbone_spec

if TYPE_CHECKING:
    from offline.data.split import Split
    from offline.training.trainer import TrainResult
    from shared.dataset.folder import Dataset
    from shared.knowledge.snapshot import KnowledgeSnapshot

log = logging.getLogger(__name__)

SU, SUI = ["scenario", "user"], ["scenario", "user", "item"]


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: the TrainConfig values it sets over the shared ones, and which snapshot it
    reads ("last": the --knowledge-last snapshot, built with --pooling last on the same split)."""

    label: str
    values: Mapping[str, Any]
    knowledge: Literal["main", "last"] = "main"

    @property
    def levels(self) -> list[str] | None:
        """The fixed LLM4MSR levels (None: the plain backbone or --levels auto)."""
        wrapped = self.values["llm4msr"] and not self.values.get("levels_auto", False)
        return list(self.values["levels"]) if wrapped else None


def _wrapped(levels: list[str], source: str = "llm", **values: Any) -> dict[str, Any]:
    return {"llm4msr": True, "knowledge_source": source, "levels": list(levels), "levels_auto": False, **values}


VARIANTS: dict[str, Variant] = {
    "plain": Variant("plain", {"llm4msr": False, "knowledge_source": "llm", "levels": SU, "levels_auto": False}),
    "auto": Variant("+LLM4MSR (levels auto)", _wrapped(SU, levels_auto=True)),
    "llm_s": Variant("+LLM4MSR (scenario)", _wrapped(["scenario"])),
    "llm_u": Variant("+LLM4MSR (user)", _wrapped(["user"])),
    "llm_i": Variant("+LLM4MSR (item)", _wrapped(["item"])),
    "llm_su": Variant("+LLM4MSR (scenario,user)", _wrapped(SU)),
    "llm_sui": Variant("+LLM4MSR (scenario,user,item)", _wrapped(SUI)),
    "llm_su_ungated": Variant("+LLM4MSR (s,u) ungated", _wrapped(SU, gate="none")),
    "llm_sui_ungated": Variant("+LLM4MSR (s,u,i) ungated", _wrapped(SUI, gate="none")),
    "llm_su_full_history": Variant("+LLM4MSR (s,u) full-history users", _wrapped(SU, user_knowledge="full-history")),
    "llm_sui_full_history": Variant(
        "+LLM4MSR (s,u,i) full-history users", _wrapped(SUI, user_knowledge="full-history")
    ),
    "llm_su_last": Variant("+LLM4MSR (s,u) last pooling", _wrapped(SU), knowledge="last"),
    "llm_sui_last": Variant("+LLM4MSR (s,u,i) last pooling", _wrapped(SUI), knowledge="last"),
    "llm_sui_rd32": Variant("+LLM4MSR (s,u,i) reduce-dim 32", _wrapped(SUI, reduce_dim=32)),
    "llm_sui_rd64": Variant("+LLM4MSR (s,u,i) reduce-dim 64", _wrapped(SUI, reduce_dim=64)),
    "llm_sui_rd128": Variant("+LLM4MSR (s,u,i) reduce-dim 128", _wrapped(SUI, reduce_dim=128)),
    "id_sui": Variant("+ID control (s,u,i)", _wrapped(SUI, "id")),
    "random_sui": Variant("+random control (s,u,i)", _wrapped(SUI, "random")),
    "id_su": Variant("+ID control (s,u)", _wrapped(SU, "id")),
    "random_su": Variant("+random control (s,u)", _wrapped(SU, "random")),
}
DEFAULT_VARIANTS = ["plain", "auto", "id_sui", "random_sui"]
# --ablations: where the gain comes from (llm_sui runs at the compare's --reduce-dim, 64 by default).
ABLATION_VARIANTS = [
    "llm_s",
    "llm_u",
    "llm_i",
    "llm_su",
    "llm_sui",
    "llm_su_ungated",
    "llm_sui_ungated",
    "llm_su_full_history",
    "llm_sui_full_history",
    "llm_su_last",
    "llm_sui_last",
    "llm_sui_rd32",
    "llm_sui_rd128",
]
LABELS = {name: variant.label for name, variant in VARIANTS.items()}


def select_variants(named: list[str] | None, ablations: bool, knowledge_last: str | None) -> tuple[str, ...]:
    """The variants of a compare: the named ones (or the default set), plus the ablations when asked. Ablations
    that need --knowledge-last are left out without it (logged); a named one is an error in CompareConfig."""
    chosen = list(named or DEFAULT_VARIANTS)
    if ablations:
        extra = [v for v in ABLATION_VARIANTS if v not in chosen]
        if knowledge_last is None:
            skipped = [v for v in extra if VARIANTS[v].knowledge == "last"]
            if skipped:
                log.warning("--ablations without --knowledge-last: %s left out", ", ".join(skipped))
            extra = [v for v in extra if v not in skipped]
        chosen += extra
    return tuple(chosen)


# TrainConfig fields that do not change what a run computes: never a reason to recompute.
NEUTRAL_CONFIG_KEYS = frozenset({"progress", "threads", "eval_batch_size"})
# Fields read only under a condition of the config: neutral for a run without it (a plain or fixed-levels run
# computes the same whatever --levels auto would have tried).
CONDITIONAL_CONFIG_KEYS: dict[str, Callable[[dict], bool]] = {
    "auto_item_init_std": lambda c: bool(c.get("levels_auto") and c.get("llm4msr")),
    "knowledge_lr_scale": lambda c: bool(c.get("llm4msr")),
    "norm_stats_batches": lambda c: backbone_spec(str(c.get("backbone"))).model_class.recountable_statistics,
}


def _computing(config: dict) -> dict:
    """The stored config's fields that decide what the run computes (absent ones read as their old behaviour)."""
    full = fill_absent(config)
    return {
        k: v
        for k, v in full.items()
        if k not in NEUTRAL_CONFIG_KEYS and (k not in CONDITIONAL_CONFIG_KEYS or CONDITIONAL_CONFIG_KEYS[k](full))
    }


def config_hash(config: dict) -> str:
    """sha256 of the training config without the neutral fields; a field newer than the record means its old
    behaviour (config.fill_absent), so a run recorded before it matches a config that asks for that behaviour."""
    return hashlib.sha256(json.dumps(_computing(config), sort_keys=True, default=str).encode()).hexdigest()


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
        old, new = _computing(old_config), _computing(config)
        reasons += [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
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
    # Shared by every run; each run sets its backbone, its variant's values (VARIANTS) and its seed.
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    backbones: tuple[str, ...] = field(default_factory=lambda: tuple(backbone_names()))
    variants: tuple[str, ...] = tuple(DEFAULT_VARIANTS)
    top_k: tuple[int, ...] = tuple(DEFAULT_TOP_K)
    report_only: bool = False  # only rebuild the report from the finished runs made with these settings
    # A snapshot built with --pooling last on the same split, for the variants that read it (mean vs last pooling).
    knowledge_last: str | None = None

    def __post_init__(self) -> None:
        for kind, names, known in (
            ("variant", self.variants, VARIANTS),
            ("backbone", self.backbones, backbone_names()),
        ):
            for name in names:
                if name not in known:
                    raise unknown_name(kind, name, known)
        needs_last = [v for v in self.variants if VARIANTS[v].knowledge == "last"]
        if needs_last and self.knowledge_last is None:
            raise UserFacingError(
                f"variant {needs_last[0]} needs --knowledge-last DIR (a snapshot built with --pooling last on the "
                "same split)"
            )

    def run_config(self, backbone: str, variant: str, seed: int) -> TrainConfig:
        return self.train.with_values(**VARIANTS[variant].values, backbone=backbone, seed=seed)


@dataclass(frozen=True)
class Snapshots:
    """The compare's knowledge: the main snapshot and, for the last-pooling variants, the second one."""

    main: KnowledgeSnapshot
    last: KnowledgeSnapshot | None = None

    def of(self, variant: str) -> KnowledgeSnapshot:
        return self.last if VARIANTS[variant].knowledge == "last" else self.main


def evaluate_run(result: TrainResult, split: Split, snapshot: KnowledgeSnapshot, top_k: list[int]) -> dict:
    """Valid and test metrics of a trained run through the serving/evaluate scoring path, with the top-K list, and
    the test split's reliability bins (overall) under "reliability"."""
    from offline.training.metrics import reliability, summarize
    from shared.artifact import in_memory_artifact
    from shared.scoring import RequestScorer, SnapshotLookup

    scorer = RequestScorer(in_memory_artifact(result.model, result.encoder, result.artifact_fields(split)))
    lookup = SnapshotLookup(snapshot) if scorer.needs_levels else None
    out: dict = {}
    for name, frame in (("valid", split.valid), ("test", split.test)):
        if len(frame):
            scores = scorer.score_rows(frame, lookup)
            out[name] = summarize(frame, scores, top_k)
            if name == "test":
                out["reliability"] = reliability(frame["label"].to_numpy(), scores, CALIBRATION_BINS)
    return out


def run_compare(config: CompareConfig) -> None:
    """Trains the runs that have no finished record made with the same settings, then writes the report."""
    from offline.common import load_split
    from shared.knowledge.snapshot import KnowledgeSnapshot

    out = Path(config.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    last = KnowledgeSnapshot(config.knowledge_last) if config.knowledge_last else None
    snapshots = Snapshots(KnowledgeSnapshot(config.knowledge), last)
    dataset, split = load_split(config.data, config.split)
    if not config.report_only:
        for seed in config.seeds:
            for backbone in config.backbones:
                for variant in config.variants:
                    _run_once(config, dataset, split, snapshots.of(variant), backbone, variant, seed)
    current, left_out = _matching_runs(config, out, split.fingerprint(), snapshots)
    if not current:
        raise UserFacingError(
            f"no finished run in {out / 'runs'} matches these settings ({len(left_out)} made with other settings); "
            "run without --report-only, or pass the options the runs were made with"
        )
    write_report(out, snapshots, current, list(config.top_k), left_out)


def _run_once(
    config: CompareConfig,
    dataset: Dataset,
    split: Split,
    snapshot: KnowledgeSnapshot,
    backbone: str,
    variant: str,
    seed: int,
) -> None:
    """Trains and records one run (snapshot: the one its variant reads), unless its record exists and was made
    with the same settings."""
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
    selection = result.level_selection
    record = {
        "backbone": backbone,
        "variant": variant,
        "seed": seed,
        "metrics": {name: m for name, m in metrics.items() if name != "reliability"},
        "reliability": metrics.get("reliability"),
        "level_selection": selection.to_dict() if selection else None,
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
    config: CompareConfig, out: Path, split_fp: str, snapshots: Snapshots
) -> tuple[list[dict], list[str]]:
    """The finished runs made with the current settings, and a line per run left out (with what changed)."""
    current, left_out = [], []
    for run in load_runs(out):
        variant = run["variant"]
        if variant not in VARIANTS or (VARIANTS[variant].knowledge == "last" and snapshots.last is None):
            left_out.append(f"{run['backbone']}__{variant}__s{run['seed']} (variant not part of these settings)")
            continue
        cfg = config.run_config(run["backbone"], variant, run["seed"]).to_dict()
        settings = run_settings(cfg, split_fp, snapshots.of(variant), list(config.top_k))
        changed = changed_settings(run, cfg, settings)
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


def _add_bins(total: dict | None, bins: dict | None) -> dict | None:
    """Reliability bins summed over runs (None: no run recorded them)."""
    if bins is None:
        return total
    if total is None:
        return {key: list(values) for key, values in bins.items()}
    return {key: [a + b for a, b in zip(total[key], bins[key])] for key in total}


def aggregate(runs: list[dict]) -> dict:
    """(backbone, variant) -> {"n": seeds, metric key -> list of values, "reliability": test bins summed over
    seeds}."""
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
        entry["reliability"] = _add_bins(entry.get("reliability"), r.get("reliability"))
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

    def by_variant(self, metric: str, title: str) -> list[str]:
        """One row per variant, one column per backbone: the overall test metric (the ablations at a glance)."""
        lines = [
            "",
            f"## {title}",
            "",
            "| variant | " + " | ".join(self.backbones) + " |",
            "|---|" + "---|" * len(self.backbones),
        ]
        for v in self.variants:
            cells = [_ms(self.table.get((b, v), {}).get(f"test/overall/{metric}", [])) for b in self.backbones]
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
        return lines

    def plot_layout(self) -> PlotLayout:
        return PlotLayout(self.table, self.backbones, self.variants, self.panels, LABELS)

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


def _knowledge_lines(snapshots: Snapshots) -> list[str]:
    lines = []
    for name, snapshot in (("", snapshots.main), ("--knowledge-last ", snapshots.last)):
        if snapshot is not None:
            space = snapshot.space
            lines.append(
                f"{name}Knowledge snapshot {snapshot.version} (space {space.id}, model {space.model}, mode "
                f"{space.mode}, pooling {space.pooling}, dim {space.dim}, fit share {snapshot.manifest.fit_share})."
            )
    return lines


def _settings_line(runs: list[dict]) -> str:
    """The shared wrapper and protocol settings (a variant may set its own, as its name says). Read from an auto run
    where there is one: a plain run may be reused from a compare with other wrapper settings, which it never read."""
    config = next(
        (r["config"] for variant in ("auto", "plain") for r in runs if r["variant"] == variant), runs[0]["config"]
    )
    config = fill_absent(config)
    keys = (
        "gate",
        "knowledge_dropout",
        "user_knowledge",
        "early_rows",
        "reduce_dim",
        "placement",
        "calibrate",
        "embed_init_std",
        "auto_item_init_std",
        "knowledge_lr_scale",
    )
    return "Settings unless the variant says otherwise: " + ", ".join(f"{k} {config.get(k)}" for k in keys) + "."


def _level_choices(runs: list[dict]) -> list[str]:
    """--levels auto: the choice of every run and the candidates' validation numbers."""
    chosen = [r for r in runs if r.get("level_selection")]
    if not chosen:
        return []
    lines = ["", "## Levels auto: choice per run (validation)", "", "| backbone | seed | chosen | candidates |"]
    lines.append("|---|---|---|---|")
    for r in sorted(chosen, key=lambda r: (r["backbone"], r["seed"])):
        sel = r["level_selection"]
        key = "valid_auc" if sel["metric"] == "auc" else "valid_logloss"
        candidates = ", ".join(f"{c['levels']} {c[key]:.4f}" for c in sel["candidates"])
        lines.append(f"| {r['backbone']} | {r['seed']} | {sel['chosen']} | {sel['metric']}: {candidates} |")
    return lines


def _report_lines(out: Path, snapshots: Snapshots, runs: list[dict], top_k: list[int]) -> list[str]:
    """report.md without its left-out list."""
    tables = ReportTables.of(runs)
    k = report_k(top_k)
    ndcg = f"ndcg@{k}"
    lines = [f"# LLM4MSR comparison: {out.name}", "", *_knowledge_lines(snapshots), _settings_line(runs)]
    lines += [
        "Early stopping on validation AUC; test split untouched by model selection. Mean ± std over seeds.",
        "",
        "Top-K metrics rank each user's test rows by score (among tied scores negatives rank first), per scenario "
        f"and, for overall, over all the user's scenarios; Recall@{k}, NDCG@{k} and MRR@{k} are means over the users "
        f"with at least one positive and one negative: {', '.join(f'{p} {tables.users(p)}' for p in tables.panels)}. "
        f"summary.json has K = {', '.join(map(str, top_k))}.",
    ]
    seconds = {"s/run": lambda e: f"{np.mean(e['seconds']):.0f}"}
    extra = {f"NDCG@{k} overall": _overall(ndcg), "GAUC": _overall("gauc"), "Logloss": _overall("logloss")}
    lines += tables.per_panel("Test AUC", "auc", extra | {"ECE": _overall("ece")} | seconds)
    lines += tables.by_variant("auc", "Test AUC overall by variant (columns: backbones)")
    lines += tables.per_panel(f"Test NDCG@{k}", ndcg, {f"MRR@{k} overall": _overall(f"mrr@{k}")})
    lines += tables.per_panel(f"Test Recall@{k}", f"recall@{k}")
    calibration = f"Test expected calibration error (ECE, {CALIBRATION_BINS} equal-width score bins)"
    lines += tables.per_panel(calibration, "ece", {"Logloss overall": _overall("logloss")})
    if any(e.get("reliability") for e in tables.table.values()):
        lines += ["", "![reliability](reliability.png)"]
    lines += ["", "## Validation AUC (model selection)", "", "| backbone | variant | overall |", "|---|---|---|"]
    lines += [f"| {b} | {LABELS[v]} | {_ms(e['valid/overall/auc'])} |" for b, v, e in tables.rows]
    lines += _level_choices(runs)
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
    out: Path, snapshots: Snapshots, runs: list[dict], top_k: list[int], left_out: list[str] | None = None
) -> Path:
    """report.md, summary.json and the plots from `runs` (the finished runs that match the current settings)."""
    if not runs:
        raise UserFacingError(f"no finished runs in {out / 'runs'}")
    tables = ReportTables.of(runs)
    lines = _report_lines(out, snapshots, runs, top_k)
    if left_out:
        lines += ["## Left out: finished runs made with other settings", ""]
        lines += [f"- {name}" for name in left_out] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({f"{b}/{v}": e for (b, v), e in tables.table.items()}, indent=1))
    k = report_k(top_k)
    layout = tables.plot_layout()
    plot_metric(out / "per_scenario_auc.png", layout, "auc", "test AUC")
    plot_metric(out / f"per_scenario_ndcg{k}.png", layout, f"ndcg@{k}", f"test NDCG@{k}")
    plot_reliability(out / "reliability.png", layout)
    plot_similarity(out, snapshots.main)
    log.info("report written to %s", report)
    return report
