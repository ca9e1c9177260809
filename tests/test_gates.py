"""Learned gates per knowledge level (shared/models/llm4msr.py): closed at init, exact in the folded serving path,
loadable from artifacts saved before gates, and a level that carries nothing stays shut while a useful one opens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fixtures_models import latent_snapshot, latent_task

from offline.data.split import SplitConfig, make_split
from offline.training.config import TrainConfig
from offline.training.metrics import auc
from offline.training.trainer import build_model
from shared.artifact import ArtifactConfig, load_artifact, save_artifact
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.features import FeatureEncoder
from shared.models.llm4msr import GATE_STEP_SCALE
from shared.models.llm4msr_config import ABSENT_MEANS, LLM4MSRConfig
from shared.scoring import RequestKnowledge, RequestScorer, SnapshotLookup

LEVEL_SETS = [
    ["scenario"],
    ["user"],
    ["item"],
    ["scenario", "user"],
    ["scenario", "user", "item"],
    ["user", "item"],
    ["scenario", "item"],
]
DIM = 40


def _model(levels: list[str], gate: str, placement: str = "both", **wrapper: object) -> CTRModel:
    cfg = ModelConfig(
        fields=[("user_id", 50), ("item_id", 80), ("scenario", 4)],
        n_scenarios=3,
        backbone="star",
        llm4msr=LLM4MSRConfig(
            levels=levels, placement=placement, gate=gate, knowledge_dim=DIM, reduce_dim=16, **wrapper
        ),
    )
    model = CTRModel(cfg)
    for level in levels:
        model.wrapper.fit_reduction(level, torch.randn(200, DIM) * 3 + 1)
    return model


def _trained_looking(model: CTRModel, std: float = 0.3) -> None:
    """Weights moved away from their init, gates opened to different degrees (0 would make the test trivial)."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, std)
        for stored in (model.wrapper.gate or {}).values():
            stored.uniform_(0.3, 1.5).div_(GATE_STEP_SCALE)


def _request(n: int = 7) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    fields = torch.stack([torch.full((n,), 3), torch.randint(0, 80, (n,)), torch.full((n,), 2)], dim=1)
    raw = {"scenario": torch.randn(1, DIM), "user": torch.randn(1, DIM), "item": torch.randn(n, DIM)}
    raw["item"][2] = float("nan")  # an unknown item: the level's average
    return fields, torch.full((n,), 1), raw


@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
@pytest.mark.parametrize("placement", ["bottom", "parallel", "both"])
@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_folded_request_path_covers_the_gates(levels, placement, gate):
    torch.manual_seed(0)
    model = _model(levels, gate, placement).eval()
    _trained_looking(model)
    path = model.wrapper.fold_for_requests()
    fields, scen, raw = _request()
    with torch.no_grad():
        expected = model(fields, scen, {lv: raw[lv] for lv in levels})
        folded = model.forward_request(fields, scen, path, raw)
        if "item" in levels:
            item_reduced = model.wrapper.reduce("item", raw["item"])
            item_reduced[2] = float("nan")  # unknown item passed reduced: the level's average, as a raw NaN row
            reduced = model.forward_request(fields, scen, path, raw, item_reduced)
        closed = _model(levels, gate, placement).eval()
        closed.load_state_dict(model.state_dict())
        for stored in (closed.wrapper.gate or {}).values():
            stored.mul_(0.5)  # half-open gates: another function, so the fold reads the gates
        other = closed.forward_request(fields, scen, closed.wrapper.fold_for_requests(), raw)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(folded, expected, atol=2e-5, rtol=1e-5)
    if "item" in levels:
        torch.testing.assert_close(reduced, expected, atol=2e-5, rtol=1e-5)
    assert (gate == "none") == torch.allclose(other, expected, atol=1e-4)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gates_start_closed_and_can_open(gate):
    """At init no knowledge reaches the score (module and fold); the gates get a gradient, so they can open."""
    torch.manual_seed(0)
    levels = ["scenario", "user", "item"]
    model = _model(levels, gate)
    assert model.wrapper.gate_strength() == {lv: 0.0 for lv in levels}
    fields, scen, raw = _request()
    other = {lv: torch.randn_like(raw[lv]) for lv in levels}
    model.eval()
    path = model.wrapper.fold_for_requests()
    with torch.no_grad():
        base = model(fields, scen, raw)
        assert torch.equal(model(fields, scen, other), base)
        torch.testing.assert_close(model.forward_request(fields, scen, path, other), base, atol=2e-5, rtol=1e-5)
    model.train()
    model(fields, scen, raw).sum().backward()
    assert all(bool(stored.grad.abs().sum() > 0) for stored in model.wrapper.gate.values())
    ungated = _model(levels, "none").eval()
    with torch.no_grad():
        assert not torch.allclose(ungated(fields, scen, other), ungated(fields, scen, raw), atol=1e-4)


def test_gate_none_has_no_gate_parameters():
    """gate="none" is the model of before gates: the same parameters, so its artifacts keep their weights."""
    torch.manual_seed(0)
    none = set(_model(["scenario", "user", "item"], "none").state_dict())
    scalar = set(_model(["scenario", "user", "item"], "scalar").state_dict())
    assert scalar - none == {"wrapper.gate.scenario", "wrapper.gate.user", "wrapper.gate.item"}
    assert none <= scalar
    assert LLM4MSRConfig().gate == "scalar"


def test_gate_decay_pulls_the_gates_closed():
    """gate_decay adds decay * a to each stored gate's gradient in training, nothing in eval or at 0."""
    grads = {}
    for decay in (0.0, 0.7):
        torch.manual_seed(0)  # the same weights and inputs for both
        model = _model(["scenario", "user", "item"], "vector", gate_decay=decay).train()
        _trained_looking(model)
        fields, scen, raw = _request()
        model(fields, scen, raw).sum().backward()
        grads[decay] = {lv: s.grad.clone() for lv, s in model.wrapper.gate.items()}
        stored = {lv: s.detach().clone() for lv, s in model.wrapper.gate.items()}
    for lv, value in stored.items():
        torch.testing.assert_close(grads[0.7][lv] - grads[0.0][lv], 0.7 * value, atol=1e-5, rtol=1e-4)


def test_knowledge_dropout_acts_in_training_only():
    torch.manual_seed(0)
    levels = ["scenario", "user", "item"]
    model = _model(levels, "scalar", knowledge_dropout=0.5)
    _trained_looking(model)
    fields, scen, raw = _request()
    model.train()
    assert not torch.allclose(model(fields, scen, raw), model(fields, scen, raw))
    plain = _model(levels, "scalar")
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(fields, scen, raw), plain(fields, scen, raw))


@pytest.mark.parametrize("levels", [["scenario", "user", "item"], ["scenario"], ["item"]])
def test_dropout_path_equals_the_per_scenario_path(levels):
    """Training with knowledge dropout projects every row itself (no per-scenario table); with a rate that
    drops nothing it is the same function as the fast path, on reduced training tables."""
    torch.manual_seed(0)
    fast = _model(levels, "vector").train()
    _trained_looking(fast)
    dropped = _model(levels, "vector", knowledge_dropout=1e-12).train()
    dropped.load_state_dict(fast.state_dict())
    n = 9
    fields = torch.stack([torch.randint(0, 50, (n,)), torch.randint(0, 80, (n,)), torch.randint(0, 3, (n,))], dim=1)
    scen = fields[:, 2].clone()
    wrapper = fast.wrapper
    rows = {"scenario": 3, "user": n, "item": n}  # all S scenarios, as the trainer passes them; one row each else
    kn = {lv: wrapper.reduce(lv, torch.randn(rows[lv], DIM)) for lv in levels}
    with torch.no_grad():
        torch.testing.assert_close(dropped(fields, scen, kn, True), fast(fields, scen, kn, True), atol=1e-5, rtol=1e-5)


def test_bad_wrapper_settings_are_clear_errors():
    with pytest.raises(UserFacingError, match=r"knowledge_dropout must be in \[0, 1\), got 1.0"):
        LLM4MSRConfig(knowledge_dropout=1.0)
    with pytest.raises(UserFacingError, match="gate_decay must be >= 0, got -1"):
        LLM4MSRConfig(gate_decay=-1)
    with pytest.raises(UserFacingError, match="levels must not be empty"):
        LLM4MSRConfig(levels=[])


def _write_as_before_gates(path) -> None:
    """config.json as the code before gates wrote it: no gate/gate_decay/knowledge_dropout anywhere, and the
    checksum over exactly that JSON."""
    file = path / "config.json"
    data = json.loads(file.read_text())
    for block in (data["model"]["llm4msr"], data["train"]):
        for key in ABSENT_MEANS:
            block.pop(key, None)
    payload = {k: v for k, v in data.items() if k not in ("checksum", "signature")}
    data["checksum"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _saved_artifact(tmp_path, levels: list[str], gate: str):
    """A real artifact (trained-looking weights, no training) over a latent task and its snapshot."""
    dataset, u, v = latent_task(users=60, items=30, rows_per_user=10, seed=2)
    split = make_split(dataset, SplitConfig())
    snap = KnowledgeSnapshot(latent_snapshot(dataset, split, u, v, tmp_path / "kn"))
    encoder = FeatureEncoder.fit(dataset, split.train)
    cfg = TrainConfig.from_flat({"levels": levels, "gate": gate, "embed_dim": 8})
    torch.manual_seed(0)
    model = build_model(cfg, encoder, snap.space.dim)
    for level in levels:
        model.wrapper.fit_reduction(level, torch.tensor((snap.items() if level == "item" else snap.users()).embeddings))
    _trained_looking(model, std=0.05)  # STAR's default layers are wide: larger weights saturate the scores
    fields = {
        "llm4msr": True,
        "knowledge_source": "llm",
        "levels": levels,
        "knowledge_space_id": snap.space.id,
        "knowledge_dim": snap.space.dim,
        "train": cfg.to_dict(),
        "data_fingerprint": split.dataset_fingerprint,
        "split_fingerprint": split.fingerprint(),
    }
    return save_artifact(tmp_path / "model", model, encoder, fields), split, snap


def _request_equals_rows(scorer: RequestScorer, split, snap) -> None:
    """One request through the folded path scores its candidates as evaluation scores the same rows."""
    row = split.test.iloc[0]
    items = split.test["item_id"].iloc[:12].tolist()
    lookup = SnapshotLookup(snap)
    knowledge = RequestKnowledge(
        scenario_vec=lookup.vectors("scenario", [row.scenario])[0],
        user_vec=lookup.vectors("user", [row.user_id])[0],
        item_vecs=lookup.vectors("item", items),
    )
    same_rows = split.test.iloc[:12].assign(scenario=row.scenario, user_id=row.user_id)
    rows = scorer.score_rows(same_rows, lookup)
    assert rows.std() > 1e-3  # the candidates differ, so the comparison is not between constants
    np.testing.assert_allclose(scorer.score(row.scenario, row.user_id, items, knowledge), rows, atol=1e-6)


def test_artifact_saved_before_gates_loads_ungated_with_the_same_scores(tmp_path):
    path, split, snap = _saved_artifact(tmp_path, ["scenario", "user", "item"], "none")
    expected = RequestScorer(load_artifact(path)).score_rows(split.test, SnapshotLookup(snap))
    _write_as_before_gates(path)
    stored = json.loads((path / "config.json").read_text())
    assert "gate" not in stored["model"]["llm4msr"] and "gate" not in stored["train"]
    # Read as a config of today (no stored-config context) it would ask for gates that have no weights.
    assert ArtifactConfig.model_validate_json((path / "config.json").read_text()).model.llm4msr.gate == "scalar"
    artifact = load_artifact(path)
    assert artifact.config.model.llm4msr.gate == "none"
    assert artifact.model.wrapper.gate is None
    scorer = RequestScorer(artifact)
    np.testing.assert_array_equal(scorer.score_rows(split.test, SnapshotLookup(snap)), expected)
    _request_equals_rows(scorer, split, snap)


def test_item_only_artifact_scores_alike_online_and_offline(tmp_path):
    path, split, snap = _saved_artifact(tmp_path, ["item"], "scalar")
    scorer = RequestScorer(load_artifact(path))
    assert scorer.needs_levels == {"item"}
    _request_equals_rows(scorer, split, snap)


def _noise_and_signal_task(seed: int = 0, users: int = 200, items: int = 2000, rows: int = 24, dim: int = 12):
    """Clicks follow an item effect that only the item knowledge reveals (about 2 train rows per item, so the
    item ID barely helps); the scenario knowledge is pure noise, a fresh random vector on every row."""
    rng = np.random.default_rng(seed)
    factors, direction = rng.normal(size=(items, 4)), rng.normal(size=4)
    mix = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    padded = np.hstack([factors + rng.normal(scale=0.1, size=factors.shape), rng.normal(scale=0.1, size=(items, 8))])
    item_knowledge = torch.tensor(padded @ mix + 3.0, dtype=torch.float32)
    n = users * rows
    item = rng.integers(items, size=n)
    fields = torch.tensor(np.stack([np.repeat(np.arange(users), rows), item, rng.integers(4, size=n)], 1))
    logit = 3.0 * (factors[item] @ direction) / 2.0
    labels = torch.tensor(rng.random(n) < 1 / (1 + np.exp(-logit)), dtype=torch.float32)
    test = torch.tensor(rng.random(n) < 0.25)
    return fields, labels, test, item_knowledge, (users, items)


def _fit(task, gate: str | None, epochs: int = 8, batch: int = 128, seed: int = 0) -> tuple[float, dict[str, float]]:
    """Trains (Adam, as the trainer) and returns the held-out AUC and the gate strengths; gate None = plain."""
    fields, labels, test, item_knowledge, (users, items) = task
    torch.manual_seed(seed)
    wrapper = None
    if gate is not None:
        wrapper = LLM4MSRConfig(
            levels=["scenario", "item"], gate=gate, knowledge_dim=12, proj_dim=8, meta_dim=16, hyper_hidden=16, rank=4
        )
    model = CTRModel(
        ModelConfig(
            fields=[("user_id", users), ("item_id", items), ("scenario", 4)],
            n_scenarios=4,
            embed_dim=8,
            backbone="shared_bottom",
            backbone_params={"bottom": [32], "tower": [16]},
            llm4msr=wrapper,
        )
    )
    if wrapper is not None:
        model.wrapper.fit_reduction("scenario", torch.randn(500, 12))
        model.wrapper.fit_reduction("item", item_knowledge)

    def knowledge(rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        noise = torch.randn(len(rows), 12)
        return None if wrapper is None else {"scenario": noise, "item": item_knowledge[fields[rows, 1]]}

    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_rows = torch.nonzero(~test).squeeze(1)
    for _ in range(epochs):
        model.train()
        for rows in train_rows[torch.randperm(len(train_rows))].split(batch):
            logits = model(fields[rows], fields[rows, 2], knowledge(rows))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[rows])
            optim.zero_grad()
            loss.backward()
            optim.step()
    model.eval()
    test_rows = torch.nonzero(test).squeeze(1)
    with torch.no_grad():
        scores = model(fields[test_rows], fields[test_rows, 2], knowledge(test_rows)).numpy()
    return auc(labels[test_rows].numpy(), scores), (model.wrapper.gate_strength() if wrapper is not None else {})


def test_a_noise_level_stays_shut_while_a_useful_level_opens():
    """The known answer: the gate of the noise level stays far below the useful level's, and the gated model is
    not worse than the plain backbone on held-out rows (here far better: the knowledge carries the signal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on any machine with this torch
    try:
        task = _noise_and_signal_task()
        plain_auc, _ = _fit(task, None)
        gated_auc, strength = _fit(task, "vector")
    finally:
        torch.set_num_threads(threads)
    assert strength["item"] > 0.2, strength
    assert strength["item"] > 3 * strength["scenario"], strength
    assert gated_auc > plain_auc - 0.005, (gated_auc, plain_auc)
    assert gated_auc > plain_auc + 0.03, (gated_auc, plain_auc)
