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
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from tests.fixtures_models import add_fit_table, write_planted_snapshot

# The CLI's defaults: embeddings init 1e-4, the item level also fitted at --auto-item-init-std 0.05.
CANDIDATES = ["none", "scenario,user", "scenario,user,item", "scenario,user,item@init=0.05"]


def _fixed_args(name: str) -> list[str]:
    """The flags of a fixed-levels run that trains candidate `name`."""
    if name == "none":
        return ["--no-llm4msr"]
    levels, _, init = name.partition("@init=")
    return ["--levels", levels, *(["--embed-init-std", init] if init else [])]


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
    assert _train_cli(synth_dir, kn, tmp_path / "fixed", *_fixed_args(chosen)) == 0
    assert _sha(tmp_path / "auto" / WEIGHTS) == _sha(tmp_path / "fixed" / WEIGHTS)
    fixed_cfg = load_artifact(tmp_path / "fixed").config
    assert (fixed_cfg.llm4msr, fixed_cfg.levels) == (artifact.llm4msr, artifact.levels)
    assert "level_selection" not in fixed_cfg.train and fixed_cfg.train["levels_auto"] is False


def test_second_init_candidate_trains_the_item_level_with_that_init(synth_dir, tmp_path):
    """The @init candidate is the model of `--levels scenario,user,item --embed-init-std <std>`, whether or not it
    wins; --auto-item-init-std 0 (or the default init itself) leaves the three level candidates."""
    from offline.training.auto_levels import candidate_configs
    from offline.training.config import TrainConfig

    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    kn = write_planted_snapshot(dataset, split, tmp_path / "kn")
    base = TrainConfig(levels_auto=True)
    assert list(candidate_configs(base)) == CANDIDATES
    assert list(candidate_configs(base.with_values(auto_item_init_std=0.0))) == CANDIDATES[:3]
    assert list(candidate_configs(base.with_values(auto_item_init_std=base.embed_init_std))) == CANDIDATES[:3]
    with pytest.raises(UserFacingError, match="auto-item-init-std"):
        candidate_configs(base.with_values(auto_item_init_std=-1.0))
    wide = candidate_configs(base.with_values(auto_item_init_std=0.02))["scenario,user,item@init=0.02"]
    assert (wide.embed_init_std, wide.wrapper.levels, wide.levels_auto) == (0.02, ["scenario", "user", "item"], False)
    # The CLI flag reaches the candidate, and the recorded candidate name says its init.
    assert _train_cli(synth_dir, kn, tmp_path / "auto", "--auto-item-init-std", "0.02", "--epochs", "1") == 0
    names = [c["levels"] for c in load_artifact(tmp_path / "auto").config.train["level_selection"]["candidates"]]
    assert names == [*CANDIDATES[:3], "scenario,user,item@init=0.02"]
    assert _train_cli(synth_dir, kn, tmp_path / "off", "--auto-item-init-std", "0", "--epochs", "1") == 0
    names = [c["levels"] for c in load_artifact(tmp_path / "off").config.train["level_selection"]["candidates"]]
    assert names == CANDIDATES[:3]


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
