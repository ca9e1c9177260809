"""`--levels auto` (offline/training/auto_levels.py): the candidates, the choice on validation, what the artifact
records, and that the chosen model is the one a fixed-levels run trains."""

from __future__ import annotations

import hashlib

import pytest
from fixtures_models import latent_snapshot, latent_task, tiny_train_config

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from offline.training.trainer import train
from shared.artifact import WEIGHTS, load_artifact
from shared.dataset.folder import read_dataset
from shared.knowledge.snapshot import KnowledgeSnapshot
from tests.fixtures_models import add_fit_table, write_planted_snapshot

CANDIDATES = ["none", "scenario,user", "scenario,user,item"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_cli(synth_dir, kn, out, *extra: str) -> int:
    args = ["train", "--data", str(synth_dir), "--knowledge", str(kn), "--out", str(out), "--epochs", "2"]
    return llm4msr_cli.main([*args, "--batch-size", "256", "--threads", "1", "--seed", "3", *extra])


def test_cli_default_is_auto_records_every_candidate_and_writes_the_chosen_model(synth_dir, tmp_path, capsys):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    kn = write_planted_snapshot(dataset, split, tmp_path / "kn")
    assert _train_cli(synth_dir, kn, tmp_path / "auto") == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("levels auto (validation AUC): "))
    artifact = load_artifact(tmp_path / "auto").config
    selection = artifact.train["level_selection"]
    assert [c["levels"] for c in selection["candidates"]] == CANDIDATES and selection["metric"] == "auc"
    aucs = {c["levels"]: c["valid_auc"] for c in selection["candidates"]}
    assert selection["chosen"] == max(CANDIDATES, key=lambda name: (aucs[name], -CANDIDATES.index(name)))
    assert line.endswith(f"-> {selection['chosen']}") and all(f"{n} {aucs[n]:.4f}" in line for n in CANDIDATES)
    assert artifact.train["levels_auto"] is True
    assert artifact.metrics["valid"]["overall"]["auc"] == pytest.approx(aucs[selection["chosen"]], abs=1e-9)
    # The chosen model is byte for byte the one a run with those levels trains (same settings, seed and threads).
    chosen = selection["chosen"]
    fixed = ["--no-llm4msr"] if chosen == "none" else ["--levels", chosen]
    assert _train_cli(synth_dir, kn, tmp_path / "fixed", *fixed) == 0
    assert _sha(tmp_path / "auto" / WEIGHTS) == _sha(tmp_path / "fixed" / WEIGHTS)
    fixed_cfg = load_artifact(tmp_path / "fixed").config
    assert (fixed_cfg.llm4msr, fixed_cfg.levels) == (artifact.llm4msr, artifact.levels)
    assert "level_selection" not in fixed_cfg.train and fixed_cfg.train["levels_auto"] is False


def test_auto_takes_the_item_level_where_it_carries_the_answer(tmp_path):
    """Known answer: clicks follow <user factor, item factor> and the knowledge holds both factors, so the
    candidate with the item level wins on validation (as in tests/test_models.py, where it gains > 0.02 AUC)."""
    dataset, u, v = latent_task(users=400, items=60, rows_per_user=24, seed=5)
    split = make_split(dataset, SplitConfig())
    vdir = latent_snapshot(dataset, split, u, v, tmp_path / "kn")
    snap = KnowledgeSnapshot(vdir)
    # The hidden factors were not built from train rows (no leak): the fit vectors are the same vectors.
    add_fit_table(vdir, dict(zip(snap.users().ids, snap.users().embeddings)))
    result = train(dataset, split, KnowledgeSnapshot(vdir), tiny_train_config(levels_auto=True, epochs=10, patience=2))
    selection = result.level_selection
    aucs = {c.levels: c.valid_auc for c in selection.candidates}
    assert selection.chosen == "scenario,user,item", aucs
    assert aucs["scenario,user,item"] > aucs["none"] + 0.05, aucs
    assert result.model.config.llm4msr.levels == ["scenario", "user", "item"]
    assert result.config.levels_auto and result.user_protocol.applied
