"""Artifact round trip, checksums, knowledge-space guard, and online/offline scoring parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_models import latent_snapshot, latent_task, tiny_train_config, write_snapshot

from offline.data.split import SplitConfig, make_split
from offline.training.metrics import summarize
from offline.training.trainer import train
from shared.artifact import (
    KEY_ENV,
    KEY_FILE_ENV,
    ArtifactConfig,
    check_knowledge_space,
    load_artifact,
    read_artifact_config,
    save_artifact,
)
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.scoring import RequestKnowledge, RequestScorer, SnapshotLookup


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    dataset, u, v = latent_task(users=150, items=50, rows_per_user=20, seed=11)
    split = make_split(dataset, SplitConfig())
    root = tmp_path_factory.mktemp("art")
    snap = KnowledgeSnapshot(latent_snapshot(dataset, split, u, v, root / "kn"))
    return dataset, split, snap, root


@pytest.fixture(scope="module")
def trained(task):
    """STAR + LLM4MSR with every level and both placements (the artifact holds the bottom and the parallel
    weights), saved and loaded back. Ungated and at both: after 2 epochs a gated model has barely opened its user
    gate, and the parallel path alone has barely used the user level (swapping users moved scores by 5e-4), while
    the permutation test below needs the user level to matter."""
    dataset, split, snap, root = task
    cfg = tiny_train_config(levels=["scenario", "user", "item"], epochs=2, gate="none", placement="both")
    result = train(dataset, split, snap, cfg)
    path = save_artifact(root / "model", result.model, result.encoder, result.artifact_fields(split))
    return result, path


def _request_knowledge(snap, scenario, user, items):
    lookup = SnapshotLookup(snap)
    return RequestKnowledge(
        scenario_vec=lookup.vectors("scenario", [scenario])[0],
        user_vec=lookup.vectors("user", [user])[0],
        item_vecs=lookup.vectors("item", items),
    )


def test_round_trip_gives_identical_scores(task, trained):
    dataset, split, snap, _ = task
    result, path = trained
    artifact = load_artifact(path)
    assert artifact.config.knowledge_space_id == snap.space.id
    assert artifact.config.levels == ["scenario", "user", "item"]
    assert artifact.config.model_version.startswith("star-llm-")
    assert RequestScorer(artifact).needs_levels == {"scenario", "user", "item"}
    probs = RequestScorer(artifact).score_rows(split.test, SnapshotLookup(snap))
    # Training gathers pre-reduced vectors, serving reduces per request: equal up to float rounding.
    assert summarize(split.test, probs)["overall"] == pytest.approx(result.metrics["test"]["overall"], rel=1e-5)
    # No pickle: the folder holds JSON and safetensors only.
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "features.json", "model.safetensors"]


def test_request_scores_match_offline_evaluation(task, trained):
    _, split, snap, _ = task
    artifact = load_artifact(trained[1])
    scorer = RequestScorer(artifact)
    offline = scorer.score_rows(split.test, SnapshotLookup(snap))
    for (user, scenario), rows in list(split.test.groupby(["user_id", "scenario"]))[:15]:
        items = rows["item_id"].tolist()
        online = scorer.score(scenario, user, items, _request_knowledge(snap, scenario, user, items))
        np.testing.assert_allclose(online, offline[rows.index.to_numpy()], atol=1e-5)
    # A candidate scores the same alone, among 500 others, and with unknown items beside it.
    user, scenario, item = split.test.iloc[0][["user_id", "scenario", "item_id"]]
    many = [item] + [f"i{j % 50}" for j in range(499)] + ["never-seen-item"]
    alone = scorer.score(scenario, user, [item], _request_knowledge(snap, scenario, user, [item]))
    crowd = scorer.score(scenario, user, many, _request_knowledge(snap, scenario, user, many))
    assert crowd.shape == (501,)
    assert abs(float(alone[0]) - float(crowd[0])) < 1e-5
    assert np.isfinite(crowd).all()


def test_pre_reduced_item_vectors_give_the_same_scores(task, trained):
    _, _, snap, _ = task
    scorer = RequestScorer(load_artifact(trained[1]))
    items = [f"i{j}" for j in range(50)] + ["never-seen-item"]
    kn = _request_knowledge(snap, "beta", "u3", items)
    assert np.isnan(kn.item_vecs[-1]).all()
    table = scorer.reduce_items(snap.items().embeddings)  # once per knowledge version, in the ranker
    rows = np.vstack([table[snap.items().positions(items[:-1])], scorer.reduce_items(kn.item_vecs[-1:])])
    fast = scorer.score("beta", "u3", items, RequestKnowledge(kn.scenario_vec, kn.user_vec, item_reduced=rows))
    np.testing.assert_allclose(fast, scorer.score("beta", "u3", items, kn), atol=1e-5)


def test_permuting_user_vectors_changes_scores(task, trained):
    _, split, snap, _ = task
    scorer = RequestScorer(load_artifact(trained[1]))
    items = [f"i{j}" for j in range(50)]
    kn = _request_knowledge(snap, "alpha", "u1", items)
    base = scorer.score("alpha", "u1", items, kn)
    other_user = SnapshotLookup(snap).vectors("user", ["u2"])[0]
    swapped = scorer.score("alpha", "u1", items, RequestKnowledge(kn.scenario_vec, other_user, kn.item_vecs))
    assert np.abs(base - swapped).max() > 1e-3
    shuffled_items = scorer.score(
        "alpha", "u1", items, RequestKnowledge(kn.scenario_vec, kn.user_vec, kn.item_vecs[::-1])
    )
    assert np.abs(base - shuffled_items).max() > 1e-3


def test_missing_knowledge_and_bad_inputs_are_clear_errors(task, trained):
    scorer = RequestScorer(load_artifact(trained[1]))
    kn = _request_knowledge(task[2], "alpha", "u1", ["i1"])
    with pytest.raises(UserFacingError, match="needs user-level knowledge"):
        scorer.score("alpha", "u1", ["i1"], RequestKnowledge(kn.scenario_vec, None, kn.item_vecs))
    with pytest.raises(UserFacingError, match="shape"):
        scorer.score("alpha", "u1", ["i1"], RequestKnowledge(kn.scenario_vec, kn.user_vec[:3], kn.item_vecs))
    with pytest.raises(UserFacingError, match="unknown scenario 'gamma'.*alpha, beta"):
        scorer.score("gamma", "u1", ["i1"], kn)
    # Unknown user: out-of-vocabulary index, still a probability.
    p = scorer.score("alpha", "nobody", ["i1"], kn)
    assert 0.0 < float(p[0]) < 1.0


def test_tampered_artifact_is_refused(trained, tmp_path):
    import shutil

    for target in ("model.safetensors", "features.json", "config.json"):
        copy = tmp_path / target
        shutil.copytree(trained[1], copy)
        file = copy / target
        if target == "config.json":
            cfg = json.loads(file.read_text())
            cfg["metrics"]["test"]["overall"]["auc"] = 0.99
            file.write_text(json.dumps(cfg))
        else:
            data = bytearray(file.read_bytes())
            data[-5] ^= 0xFF
            file.write_bytes(bytes(data))
        with pytest.raises(UserFacingError, match="checksum mismatch"):
            load_artifact(copy)
    missing = tmp_path / "missing"
    shutil.copytree(trained[1], missing)
    (missing / "features.json").unlink()
    with pytest.raises(UserFacingError, match="features.json is missing"):
        load_artifact(missing)
    with pytest.raises(UserFacingError, match="not a model artifact"):
        load_artifact(tmp_path / "nowhere")


def test_snapshot_of_another_knowledge_space_is_refused(task, trained, tmp_path):
    dataset, split, snap, _ = task
    artifact = load_artifact(trained[1])
    t = snap.users()
    other = KnowledgeSnapshot(
        write_snapshot(
            tmp_path / "other",
            split,
            dict(zip(snap.scenarios().ids, snap.scenarios().embeddings)),
            dict(zip(t.ids, t.embeddings)),
            dict(zip(snap.items().ids, snap.items().embeddings)),
            model="another-llm",
        )
    )
    assert other.space.id != snap.space.id
    with pytest.raises(UserFacingError, match="knowledge space mismatch"):
        check_knowledge_space(artifact.config, other.space.id)
    with pytest.raises(UserFacingError, match="knowledge space mismatch"):
        RequestScorer(artifact).score_rows(split.test, SnapshotLookup(other))


def test_id_control_ignores_the_snapshot(task, tmp_path):
    dataset, split, snap, _ = task
    t = snap.users()
    rng = np.random.default_rng(0)
    scrambled = KnowledgeSnapshot(
        write_snapshot(
            tmp_path / "scrambled",
            split,
            dict(zip(snap.scenarios().ids, rng.normal(size=snap.scenarios().embeddings.shape))),
            dict(zip(t.ids, t.embeddings[rng.permutation(len(t.ids))])),
            dict(zip(snap.items().ids, rng.normal(size=snap.items().embeddings.shape))),
        )
    )
    cfg = tiny_train_config(knowledge_source="id", levels=["scenario", "user", "item"], epochs=2)
    a = train(dataset, split, snap, cfg)
    b = train(dataset, split, scrambled, cfg)
    c = train(dataset, split, None, cfg)
    assert a.metrics == b.metrics == c.metrics
    path = save_artifact(tmp_path / "id", a.model, a.encoder, a.artifact_fields(split))
    artifact = load_artifact(path)
    assert artifact.config.knowledge_space_id is None and artifact.config.knowledge_source == "id"
    scorer = RequestScorer(artifact)
    assert scorer.needs_levels == frozenset()
    items = ["i1", "i2", "i3"]
    plain = scorer.score("alpha", "u1", items, RequestKnowledge())
    noisy = scorer.score("alpha", "u1", items, _request_knowledge(scrambled, "alpha", "u1", items))
    np.testing.assert_array_equal(plain, noisy)


def test_random_control_vectors_are_stored_in_the_artifact(task, tmp_path):
    dataset, split, snap, _ = task
    r = train(dataset, split, snap, tiny_train_config(knowledge_source="random", epochs=1))
    path = save_artifact(tmp_path / "rnd", r.model, r.encoder, r.artifact_fields(split))
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    assert "wrapper.random_user" in tensors
    np.testing.assert_array_equal(tensors["wrapper.random_user"].numpy(), r.model.wrapper.random_user.numpy())
    # Loading must restore the stored vectors, not draw new ones: two loads under different torch seeds (which a
    # fresh draw would follow) score alike, and like the trained model.
    torch.manual_seed(1)
    first = RequestScorer(load_artifact(path)).score_rows(split.test, None)
    torch.manual_seed(2)
    second = RequestScorer(load_artifact(path)).score_rows(split.test, None)
    np.testing.assert_array_equal(first, second)
    overall = summarize(split.test, first)["overall"]
    assert overall == pytest.approx(r.metrics["test"]["overall"], rel=1e-6)


def _rewrite_config(path, change) -> None:
    """An edit that keeps the checksums valid, as anyone who can write the folder can do."""
    file = path / "config.json"
    cfg = ArtifactConfig.model_validate_json(file.read_text())
    change(cfg)
    cfg.checksum = cfg.config_checksum()
    file.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")


def test_signing_detects_tampering_that_checksums_cannot(task, trained, tmp_path, monkeypatch):
    import hashlib
    import shutil

    _, split, _, _ = task
    result, unsigned = trained
    key = "k" * 40
    monkeypatch.setenv(KEY_ENV, key)
    signed = save_artifact(tmp_path / "signed", result.model, result.encoder, result.artifact_fields(split))
    assert json.loads((signed / "config.json").read_text())["signature"].startswith("hmac-sha256:")
    assert (
        load_artifact(signed).config.files["model.safetensors"]
        == json.loads((unsigned / "config.json").read_text())["files"]["model.safetensors"]
    )

    # Metrics rewritten with a valid checksum: only the signature notices.
    edited = tmp_path / "edited"
    shutil.copytree(signed, edited)
    _rewrite_config(edited, lambda c: c.metrics["test"]["overall"].update(auc=0.99))
    with pytest.raises(UserFacingError, match="invalid signature"):
        read_artifact_config(edited)
    # Weights replaced, their sha256 updated in the config: refused too.
    swapped = tmp_path / "swapped"
    shutil.copytree(signed, swapped)
    weights = bytearray((swapped / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (swapped / "model.safetensors").write_bytes(bytes(weights))
    digest = hashlib.sha256(bytes(weights)).hexdigest()
    _rewrite_config(swapped, lambda c: c.files.update({"model.safetensors": digest}))
    with pytest.raises(UserFacingError, match="invalid signature"):
        load_artifact(swapped)
    # An unsigned artifact, or one signed with another key, is refused while a key is set.
    with pytest.raises(UserFacingError, match="not signed, but LLM4MSR_ARTIFACT_KEY"):
        load_artifact(unsigned)
    monkeypatch.setenv(KEY_ENV, "o" * 40)
    with pytest.raises(UserFacingError, match="invalid signature"):
        load_artifact(signed)

    # The key from a file (trailing newline ignored) verifies the same signature.
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "artifact.key"
    key_file.write_text(key + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    assert load_artifact(signed).config.signature
    monkeypatch.setenv(KEY_ENV, key)
    with pytest.raises(UserFacingError, match="only one of"):
        load_artifact(signed)

    # Without a key: loads as before, signed or not; the checksums alone cannot see the rewritten metrics.
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.delenv(KEY_FILE_ENV)
    assert load_artifact(signed).config.signature
    assert read_artifact_config(edited).metrics["test"]["overall"]["auc"] == 0.99
    load_artifact(swapped)


def test_bad_keys_are_clear_errors(trained, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(UserFacingError, match="LLM4MSR_ARTIFACT_KEY is 5 bytes; use at least 32"):
        load_artifact(trained[1])
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "no-such.key"))
    with pytest.raises(UserFacingError, match="cannot read the key file"):
        load_artifact(trained[1])


def test_artifact_written_before_signing_still_loads(trained, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained[1], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["signature"]  # the field did not exist then; the checksum never covered it
    (old / "config.json").write_text(json.dumps(cfg))
    assert load_artifact(old).config.checksum == cfg["checksum"]


@pytest.mark.parametrize(
    ("fields", "uncalibrated"),
    [(("calibration", "embed_init_std"), True), (("embed_init_std",), False), (("embed_init_std",), True)],
)
def test_artifact_written_before_newer_model_settings_still_loads(trained, tmp_path, fields, uncalibrated):
    """An artifact saved before a model setting existed has neither the key nor the checksum over it: it loads,
    with the value its absence means (raw scores; the embeddings' first init). Calibration came first, so an
    artifact may hold it, at any value, without the init."""
    import copy
    import hashlib
    import shutil

    from shared.models.llm4msr_config import ABSENT_MEANS

    old = tmp_path / "old"
    shutil.copytree(trained[1], old)
    cfg = json.loads((old / "config.json").read_text())
    if uncalibrated:
        cfg["model"]["calibration"] = [1.0, 0.0]
    for name in fields:
        del cfg["model"][name]
    payload = copy.deepcopy({k: v for k, v in cfg.items() if k not in ("checksum", "signature")})
    wrapper = payload["model"]["llm4msr"]  # the wrapper's own newer fields, left out at their absent value
    payload["model"]["llm4msr"] = {k: v for k, v in wrapper.items() if ABSENT_MEANS.get(k, object()) != v}
    cfg["checksum"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    (old / "config.json").write_text(json.dumps(cfg))
    loaded = load_artifact(old)
    assert loaded.config.checksum == cfg["checksum"]
    if "calibration" in fields:
        assert loaded.model.config.calibration == (1.0, 0.0)
    if "embed_init_std" in fields:
        assert loaded.model.config.embed_init_std == 0.05
    # Any other edit is still refused.
    cfg["model"]["embed_dim"] += 1
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserFacingError, match="checksum mismatch"):
        load_artifact(old)
