"""The compare report's plots (PNG): per-scenario bars of a metric, the scenarios' knowledge similarity, and the
reliability diagram (calibration) of every variant per backbone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import UserFacingError

if TYPE_CHECKING:
    from shared.knowledge.snapshot import KnowledgeSnapshot


@dataclass(frozen=True)
class PlotLayout:
    """What every plot of one report shares: the aggregated runs and their order."""

    table: dict[tuple[str, str], dict]  # (backbone, variant) -> compare.aggregate()'s entry
    backbones: list[str]
    variants: list[str]
    panels: list[str]  # "overall", then each scenario
    labels: dict[str, str]  # variant -> its label


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (imported here: the CLI must not pay for it at start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(file: Path, layout: PlotLayout, metric: str, title: str) -> None:
    """Bars per backbone and variant (mean ± std over seeds), one panel for overall and each scenario."""
    plt = _pyplot()
    table, backbones, variants, panels = layout.table, layout.backbones, layout.variants, layout.panels

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
            ax.bar(x, means, width, yerr=errs, label=layout.labels[v], capsize=2)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        ax.set_ylim(max(0.0, lo - 0.03), None)
        ax.set_title(f"{title}: {panel}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_similarity(out: Path, snapshot: KnowledgeSnapshot) -> None:
    """Cosine similarity of the scenario vectors, raw and centred (scenario_similarity.png)."""
    plt = _pyplot()

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


def plot_reliability(file: Path, layout: PlotLayout) -> bool:
    """Reliability diagram per backbone: observed positive rate against mean score per score bin (bins pooled
    over seeds), one line per variant, the diagonal = perfect calibration. False (nothing written) when no run
    recorded its bins (runs made before calibration was recorded)."""
    entries = {key: e["reliability"] for key, e in layout.table.items() if e.get("reliability")}
    backbones = [b for b in layout.backbones if any(k[0] == b for k in entries)]
    if not backbones:
        return False
    plt = _pyplot()
    ncols = min(4, len(backbones))
    nrows = -(-len(backbones) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols + 3.0, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(backbones) :]:
        ax.axis("off")
    colors = plt.get_cmap("tab20").colors  # up to 20 variants, each its own colour in every panel
    for ax, backbone in zip(axes.flat, backbones):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for j, variant in enumerate(layout.variants):
            bins = entries.get((backbone, variant))
            if bins is None:
                continue
            rows = np.asarray(bins["rows"])
            used = rows > 0
            mean_score = np.asarray(bins["score_sum"])[used] / rows[used]
            rate = np.asarray(bins["label_sum"])[used] / rows[used]
            style = {"color": colors[j % len(colors)], "marker": "o", "markersize": 3, "linewidth": 1}
            ax.plot(mean_score, rate, label=layout.labels[variant], **style)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean score in bin")
        ax.set_ylabel("positive rate in bin")
        ax.set_title(f"reliability (test): {backbone}")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / (4.5 * ncols + 3.0), 1))
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return True
