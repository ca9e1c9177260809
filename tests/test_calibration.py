"""Calibration: expected calibration error and reliability bins (offline/training/metrics.py) on known answers, and
their place in evaluate's metrics and in the compare report (table + reliability plot); Platt scaling fitted on
validation after training (offline/training/calibration.py), kept by the artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from offline.training.metrics import (
    CALIBRATION_BINS,
    calibration_error,
    expected_calibration_error,
    logloss,
    reliability,
    summarize,
)
from shared.dataset.folder import read_dataset
from tests.fixtures_models import tiny_train_config, write_planted_snapshot


def test_ece_known_answers():
    # Two rows alone in bins 13 and 1, each 0.1 from its label; two rows of 0.5 in bin 7 with one positive: 0.
    assert expected_calibration_error([1, 0, 1, 0], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.05)
    assert expected_calibration_error([0, 0, 0, 0], [0.8] * 4) == pytest.approx(0.8)
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.0)  # rate 1/4 = score
    # Scores 0.28 and 0.32 share bin 4 of 15 ([4/15, 5/15)): their mean 0.30 against a rate of 0.5 -> 0.2.
    assert expected_calibration_error([1, 0], [0.28, 0.32]) == pytest.approx(0.2)
    # With 10 bins they split (bins 2 and 3): 0.28 vs 1 and 0.32 vs 0 -> (0.72 + 0.32) / 2.
    assert expected_calibration_error([1, 0], [0.28, 0.32], bins=10) == pytest.approx(0.52)
    assert math.isnan(expected_calibration_error([1, 0], [0.5, float("nan")]))
    assert math.isnan(expected_calibration_error([], []))


def test_reliability_bins_edges_and_sums():
    edges = np.array([0.0, 1 / 15, 0.5, 14 / 15 - 1e-9, 1.0])
    bins = reliability(np.array([0, 1, 1, 0, 1]), edges)
    assert len(bins["rows"]) == CALIBRATION_BINS
    assert [i for i, n in enumerate(bins["rows"]) for _ in range(int(n))] == [0, 1, 7, 13, 14]  # p = 1 -> last bin
    assert bins["label_sum"][14] == 1 and bins["score_sum"][7] == pytest.approx(0.5)
    # Bins add over runs (seeds) before the ratio: the ECE of the sum is the ECE of the pooled rows.
    y1, p1, y2, p2 = [1, 0, 0], [0.7, 0.2, 0.65], [1, 1], [0.95, 0.3]
    summed = {k: [a + b for a, b in zip(reliability(y1, p1)[k], reliability(y2, p2)[k])] for k in bins}
    assert calibration_error(summed) == pytest.approx(expected_calibration_error(y1 + y2, p1 + p2))


def test_summarize_reports_ece_overall_and_per_scenario():
    import pandas as pd

    frame = pd.DataFrame({"user_id": ["a", "a", "b", "b"], "scenario": ["x", "x", "y", "y"], "label": [1, 0, 1, 0]})
    out = summarize(frame, np.array([0.9, 0.1, 0.5, 0.5], dtype=np.float32), top_k=())
    assert out["overall"]["ece"] == pytest.approx(0.05, abs=1e-6)
    assert out["per_scenario"]["x"]["ece"] == pytest.approx(0.1, abs=1e-6)
    assert out["per_scenario"]["y"]["ece"] == pytest.approx(0.0, abs=1e-6)


def test_compare_report_has_calibration_table_and_reliability_plot(synth_dir, tmp_path):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    kn = write_planted_snapshot(dataset, split, tmp_path / "kn")
    out = tmp_path / "report"
    args = ["compare", "--data", str(synth_dir), "--knowledge", str(kn), "--seeds", "1", "--backbones", "star"]
    args += ["--variants", "plain,llm_su", "--epochs", "1", "--batch-size", "512", "--threads", "1", "--out", str(out)]
    assert llm4msr_cli.main(args) == 0
    report = (out / "report.md").read_text()
    assert "## Test expected calibration error (ECE, 15 equal-width score bins)" in report
    assert "![reliability](reliability.png)" in report and (out / "reliability.png").stat().st_size > 5000
    section = report.split("## Test expected calibration error")[1].split("\n## ")[0]
    for variant, row_start in (("plain", "| star | plain |"), ("llm_su", "| star | +LLM4MSR (scenario,user) |")):
        record = json.loads((out / "runs" / f"star__{variant}__s0.json").read_text())
        bins = record["reliability"]
        assert sum(bins["rows"]) == len(split.test) and sum(bins["label_sum"]) == split.test["label"].sum()
        ece = record["metrics"]["test"]["overall"]["ece"]
        assert calibration_error(bins) == pytest.approx(ece, abs=1e-6)
        row = next(x for x in section.splitlines() if x.startswith(row_start))
        assert row.split(" | ")[3] == f"{ece:.4f}"  # backbone, variant, seeds, then overall


def test_platt_scaling_recovers_a_known_map():
    from offline.training.calibration import fit_platt

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 40_000)
    labels = rng.random(len(logits)) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))  # true map: 0.5 * logit - 1
    fitted = fit_platt(logits, labels)
    assert fitted.scale == pytest.approx(0.5, abs=0.03) and fitted.bias == pytest.approx(-1.0, abs=0.05)
    assert fitted.valid_logloss_after < fitted.valid_logloss_before
    assert fit_platt(logits, np.zeros(len(logits))) is None  # one class: undefined
    # A model that ranks backwards: the best positive scale is ~0, which would round every float32 score to the
    # base rate and lose the ranking; it keeps its raw scores.
    assert fit_platt(logits, ~labels) is None
    assert fit_platt(np.array([0.1, np.nan]), np.array([0, 1])) is None


def test_training_calibrates_on_validation_keeps_the_ranking_and_the_artifact_keeps_it(synth_dir, tmp_path):
    from offline.training.trainer import train
    from shared.artifact import load_artifact, save_artifact
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestScorer, SnapshotLookup

    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    snap = KnowledgeSnapshot(write_planted_snapshot(dataset, split, tmp_path / "kn"))
    runs = {
        calibrate: train(
            dataset,
            split,
            snap,
            tiny_train_config(levels=["scenario", "user", "item"], epochs=6, lr=1e-2, calibrate=calibrate),
        )
        for calibrate in (False, True)
    }
    raw, calibrated = runs[False].metrics, runs[True].metrics
    scale, bias = runs[True].model.config.calibration
    assert runs[False].model.config.calibration == (1.0, 0.0) and scale > 0 and (scale, bias) != (1.0, 0.0)
    for name in ("valid", "test"):  # the same weights, mapped monotonically: the same ranking
        assert calibrated[name]["overall"]["auc"] == pytest.approx(raw[name]["overall"]["auc"], abs=1e-4)
    assert calibrated["valid"]["overall"]["logloss"] < raw["valid"]["overall"]["logloss"]
    path = save_artifact(tmp_path / "model", runs[True].model, runs[True].encoder, runs[True].artifact_fields(split))
    artifact = load_artifact(path)
    assert artifact.config.model.calibration == (scale, bias)
    assert artifact.config.train["calibration"]["scale"] == pytest.approx(scale, abs=1e-6)
    scores = RequestScorer(artifact).score_rows(split.test, SnapshotLookup(snap))
    assert logloss(split.test["label"].to_numpy(), scores) == pytest.approx(
        calibrated["test"]["overall"]["logloss"], abs=1e-5
    )
