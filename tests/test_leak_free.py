"""The leak-free protocol of the user level in training (offline/training/leakage.py): which vector each train
row reads, the refusal of a snapshot without fit vectors, and what the artifact records.

Planted knowledge (no LLM): fixtures_models' planted snapshot holds the fit user table a knowledge build writes
(users_fit.parquet, manifest fit_share): each user's mean item vector over the EARLY train positives only (offline/data/fit_cutoff.fit_history), as the serve vector is over all train positives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_models import tiny_train_config, write_planted_snapshot

import llm4msr_cli
from offline.data.fit_cutoff import DEFAULT_FIT_SHARE, early_train_mask
from offline.data.split import SplitConfig, make_split
from offline.training.trainer import KnowledgeTables, prepare, seed_everything, train
from shared.artifact import load_artifact, save_artifact
from shared.dataset.folder import read_dataset
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot


@pytest.fixture(scope="module")
def synth(synth_dir, tmp_path_factory):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    root = tmp_path_factory.mktemp("kn")
    return (
        dataset,
        split,
        write_planted_snapshot(dataset, split, root / "fit"),
        write_planted_snapshot(dataset, split, root / "serve-only", with_fit=False),
    )


def test_train_rows_read_fit_vectors_after_the_cutoff_and_valid_rows_serve_vectors(synth):
    dataset, split, kn, _ = synth
    snap = KnowledgeSnapshot(kn)
    cfg = tiny_train_config(epochs=1)
    seed_everything(0)
    prepared = prepare(dataset, split, snap, cfg)
    train_rows, early = prepared.data["train"], early_train_mask(split, DEFAULT_FIT_SHARE)
    assert len(train_rows) == len(split.train) and 0 < early.sum() < len(early)
    # The row indices, read back against the raw tables: early -> cold start, late -> fit, valid -> serve.
    raw = KnowledgeTables(snap, prepared.encoder.scenarios, ["scenario", "user"], fit_users=True).tables["user"]
    gathered = raw.index_select(0, train_rows.user_row).numpy()
    np.testing.assert_array_equal(gathered[early], np.broadcast_to(snap.default_user(), (early.sum(), snap.space.dim)))
    late_fit, found = snap.fit_users().lookup(split.train["user_id"].astype(str).to_numpy()[~early].tolist())
    assert found.all()
    np.testing.assert_array_equal(gathered[~early], late_fit)
    valid_rows = raw.index_select(0, prepared.data["valid"].user_row).numpy()
    serve, _ = snap.users().lookup(split.valid["user_id"].astype(str).tolist())
    np.testing.assert_array_equal(valid_rows, serve)
    assert not np.allclose(late_fit, snap.users().lookup(split.train["user_id"].astype(str)[~early].tolist())[0])
    assert prepared.protocol.applied and prepared.protocol.late_train_rows == int((~early).sum())

    dropped = prepare(dataset, split, snap, cfg.with_values(early_rows="drop"))
    assert len(dropped.data["train"]) == int((~early).sum()) == dropped.protocol.late_train_rows
    full = prepare(dataset, split, snap, cfg.with_values(user_knowledge="full-history"))
    assert (
        len(full.data["train"]) == len(split.train)
        and int(full.data["train"].user_row.max()) < len(snap.users().ids) + 1
    )


def test_snapshot_without_fit_vectors_is_refused_naming_both_fixes(synth_dir, synth, tmp_path, capsys):
    dataset, split, _, serve_only = synth
    with pytest.raises(UserFacingError, match=r"no fit user vectors.*--fit-share 0\.7.*--user-knowledge full-history"):
        train(dataset, split, KnowledgeSnapshot(serve_only), tiny_train_config(epochs=1))
    args = ["train", "--data", str(synth_dir), "--knowledge", str(serve_only), "--out", str(tmp_path / "m")]
    args += ["--epochs", "1", "--threads", "1", "--batch-size", "512"]
    assert llm4msr_cli.main(args) == 2  # --levels auto: refused before the first candidate trains
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm4msr knowledge build ... --fit-share 0.7" in err
    assert not (tmp_path / "m").exists()
    # The old protocol, a model without the user level and the controls need no fit vectors.
    snap = KnowledgeSnapshot(serve_only)
    assert train(dataset, split, snap, tiny_train_config(epochs=1, user_knowledge="full-history")).best_epoch == 1
    assert train(dataset, split, snap, tiny_train_config(epochs=1, levels=["scenario", "item"])).best_epoch == 1
    assert train(dataset, split, snap, tiny_train_config(epochs=1, knowledge_source="id")).best_epoch == 1


def test_artifact_records_the_protocol_and_says_when_it_does_not_apply(synth, tmp_path):
    dataset, split, kn, _ = synth
    snap = KnowledgeSnapshot(kn)
    runs = {
        "leak-free": tiny_train_config(epochs=1),
        "drop": tiny_train_config(epochs=1, early_rows="drop"),
        "id": tiny_train_config(epochs=1, knowledge_source="id"),
        "plain": tiny_train_config(epochs=1, llm4msr=False),
    }
    recorded = {}
    for name, cfg in runs.items():
        result = train(dataset, split, snap, cfg)
        out = save_artifact(tmp_path / name, result.model, result.encoder, result.artifact_fields(split))
        recorded[name] = load_artifact(out).config.train
    n_early = int(early_train_mask(split, DEFAULT_FIT_SHARE).sum())
    assert recorded["leak-free"]["user_knowledge"] == "leak-free"
    assert recorded["leak-free"]["user_protocol"] == {
        "protocol": "leak-free",
        "why": "",
        "fit_share": DEFAULT_FIT_SHARE,
        "early_rows": "default_user",
        "early_train_rows": n_early,
        "late_train_rows": len(split.train) - n_early,
    }
    assert recorded["drop"]["user_protocol"]["early_rows"] == "drop"
    assert recorded["id"]["user_protocol"]["protocol"] == "not applicable"
    assert recorded["id"]["user_protocol"]["why"] == "the id control reads no LLM vectors"
    assert recorded["plain"]["user_protocol"]["why"] == "the plain backbone reads no knowledge"
    assert json.loads((tmp_path / "leak-free" / "config.json").read_text())["train"]["early_rows"] == "default_user"
