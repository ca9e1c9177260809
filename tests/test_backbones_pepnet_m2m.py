"""PEPNet and M2M (issue 15): registered like the other backbones, row-wise in eval mode, able to learn what only the
scenario explains, served by the folded LLM4MSR path and by the controls exactly as the module scores, saved and
loaded without changing a score, and reproducible at 2 threads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fixtures_models import tiny_train_config, write_planted_snapshot

import llm4msr_cli
from offline.data.split import Split, SplitConfig, make_split
from offline.training.metrics import auc
from offline.training.trainer import TrainResult, train
from shared.artifact import in_memory_artifact, load_artifact, save_artifact
from shared.dataset.folder import Dataset, read_dataset
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.models.backbones import backbone_names, build_backbone
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.llm4msr import LLM4MSRConfig
from shared.scoring import RequestKnowledge, RequestScorer, SnapshotLookup

BACKBONES = ("pepnet", "m2m")
THREADS = 2


def test_registered_and_compared_by_default():
    assert set(BACKBONES) <= set(backbone_names())
    args = llm4msr_cli.build_parser().parse_args(["compare", "--data", "d", "--knowledge", "k", "--out", "o"])
    assert set(BACKBONES) <= set(args.backbones)
    for name in BACKBONES:
        with pytest.raises(UserFacingError, match=f"invalid {name} parameters.*no_such_param"):
            build_backbone(name, {"no_such_param": 1}, 8, 2)


@pytest.mark.parametrize("name", BACKBONES)
def test_eval_scores_do_not_depend_on_the_batch(name):
    """A row scores the same alone, shuffled, in a mixed batch and in a one-scenario batch (a ranking request, which
    M2M serves with its scenario's weights only); dropout is off in eval mode."""
    torch.manual_seed(0)
    model = build_backbone(name, {"dropout": 0.3}, 24, 3)
    x, s = torch.randn(96, 24), torch.randint(0, 3, (96,))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):  # trained-looking weights: the gates and generated layers move away from their init
        optim.zero_grad()
        F.binary_cross_entropy_with_logits(model(x, s), (x[:, 0] > 0).float()).backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        full = model(x, s)
        single = torch.stack([model(x[i : i + 1], s[i : i + 1])[0] for i in range(8)])
        shuffled = model(x.flip(0), s.flip(0)).flip(0)
        ones = s == 1
        one_scenario = model(x[ones], s[ones])
    assert full.std() > 1e-2  # not a constant function
    torch.testing.assert_close(single, full[:8], atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_scenario, full[ones], atol=1e-6, rtol=0)


def _flip_rows(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features without any scenario information; the click follows x_0 in scenario 0 and -x_0 in scenario 1."""
    x = torch.randn(n, 8, generator=gen)
    scenario = torch.randint(0, 2, (n,), generator=gen)
    logit = 3.0 * x[:, 0] * (1 - 2 * scenario.float())
    return x, scenario, (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()


def _fit_and_score(name: str, blind: bool) -> float:
    """Test AUC of the backbone trained on the flip rows; blind: every row gets scenario 0."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    (x, s, y), (xt, st, yt) = _flip_rows(4096, gen), _flip_rows(4096, gen)
    if blind:
        s, st = torch.zeros_like(s), torch.zeros_like(st)
    model = build_backbone(name, {}, 8, 2)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for start in range(0, len(x), 256):
            rows = slice(start, start + 256)
            optim.zero_grad()
            F.binary_cross_entropy_with_logits(model(x[rows], s[rows]), y[rows]).backward()
            optim.step()
    model.eval()
    with torch.no_grad():
        return auc(yt.numpy(), model(xt, st).numpy())


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_learns_what_only_the_scenario_explains(name):
    """The scenario reaches the model only through the backbone's own path (PEPNet's gates, M2M's generated
    weights): the Bayes-optimal test AUC of this task is about 0.92; without the scenario it is 0.5."""
    aware, blind = _fit_and_score(name, blind=False), _fit_and_score(name, blind=True)
    assert aware > 0.85, aware
    assert blind < 0.56, blind


LEVEL_SETS = [
    ["scenario"],
    ["user"],
    ["scenario", "user"],
    ["scenario", "user", "item"],
    ["user", "item"],
    ["scenario", "item"],
]


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("placement", ["bottom", "parallel", "both"])
@pytest.mark.parametrize("name", BACKBONES)
def test_folded_request_path_equals_the_module(name, levels, placement):
    """The serving fold of the wrapper in front of these backbones scores one request as the module does (the
    backbone then sees a one-scenario batch: M2M's single-scenario path), with missing (NaN) vectors."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        fields=[("user_id", 50), ("item_id", 80), ("scenario", 4)],
        n_scenarios=3,
        backbone=name,
        llm4msr=LLM4MSRConfig(levels=levels, placement=placement, knowledge_dim=40, reduce_dim=16),
    )
    model = CTRModel(cfg).eval()
    with torch.no_grad():
        # Trained-looking weights: the embeddings' and the wrapper's drawn anew (its zero-initialised bottom must matter too), the
        # backbone's moved off their init (PEPNet's gates off 1) but kept at its scale: drawing them all at 0.3
        # makes M2M's residual tower amplify float rounding ~100 times, which tests the draw, not the fold.
        for param in [*model.wrapper.parameters(), model.embedding.weight]:
            param.normal_(0, 0.3)
        for param in model.backbone.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    for level in levels:
        model.wrapper.fit_reduction(level, torch.randn(200, 40) * 3 + 1)
    path = model.wrapper.fold_for_requests()
    n = 7
    fields = torch.stack([torch.full((n,), 3), torch.randint(0, 80, (n,)), torch.full((n,), 2)], dim=1)
    scen = torch.full((n,), 1)
    raw = {"scenario": torch.randn(1, 40), "user": torch.randn(1, 40), "item": torch.randn(n, 40)}
    raw["item"][2] = float("nan")
    raw["user"][0, 5] = float("nan")
    with torch.no_grad():
        expected = model(fields, scen, {lv: raw[lv] for lv in levels})
        folded = model.forward_request(fields, scen, path, raw)
        other = {**raw, levels[0]: torch.randn(*raw[levels[0]].shape)}
        moved = model.forward_request(fields, scen, path, other)
    assert expected.std() > 1e-2  # candidates are told apart: the comparison is not between constants
    torch.testing.assert_close(folded, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-4)  # the knowledge reaches the score


@dataclass(frozen=True)
class Planted:
    """The small synthetic dataset, its split and a planted knowledge snapshot built on it."""

    dataset: Dataset
    split: Split
    snapshot: KnowledgeSnapshot


@pytest.fixture(scope="module")
def planted(synth_dir, tmp_path_factory) -> Planted:
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    root = write_planted_snapshot(dataset, split, tmp_path_factory.mktemp("kn") / "kn")
    return Planted(dataset, split, KnowledgeSnapshot(root))


# variant -> training overrides. The LLM variant reads scenario and item knowledge (the item level is the fold's
# widest path); the controls read scenario and user through their id / random tables.
VARIANTS = {
    "plain": dict(llm4msr=False),
    "llm": dict(knowledge_source="llm", levels=["scenario", "item"]),
    "id": dict(knowledge_source="id", levels=["scenario", "user"]),
    "random": dict(knowledge_source="random", levels=["scenario", "user"]),
}


def _train(planted: Planted, name: str, variant: str) -> TrainResult:
    # 256 rows per batch: large enough for torch's multi-threaded kernels at 2 threads (tests/test_determinism.py)
    cfg = tiny_train_config(backbone=name, epochs=1, batch_size=256, threads=THREADS, **VARIANTS[variant])
    return train(planted.dataset, planted.split, planted.snapshot, cfg)


@pytest.mark.parametrize("variant", ["plain", "llm"])
@pytest.mark.parametrize("name", BACKBONES)
def test_same_seed_same_weights_at_two_threads(planted, name, variant):
    first, second = _train(planted, name, variant), _train(planted, name, variant)
    assert first.runtime["torch_threads"] == THREADS
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    differ = sorted(key for key in a if not torch.equal(a[key], b[key]))
    assert not differ, f"{name} {variant}: weights differ between two trainings with the same seed: {differ}"


def _request(planted: Planted) -> tuple[pd.DataFrame, RequestKnowledge]:
    """One user's candidates in one scenario (the first test row's), plus an item no snapshot knows."""
    row = planted.split.test.iloc[0]
    items = [*planted.dataset.items["item_id"].astype(str).head(24), "no-such-item"]
    frame = pd.DataFrame({"user_id": str(row["user_id"]), "item_id": items, "scenario": str(row["scenario"])})
    lookup = SnapshotLookup(planted.snapshot)
    knowledge = RequestKnowledge(
        scenario_vec=lookup.vectors("scenario", [frame["scenario"][0]])[0],
        user_vec=lookup.vectors("user", [frame["user_id"][0]])[0],
        item_vecs=lookup.vectors("item", items),
    )
    return frame, knowledge


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", BACKBONES)
def test_saved_artifact_serves_what_was_trained(planted, name, variant, tmp_path: Path):
    """Save and load change no weight and no score; one request through the service's path (folded wrapper for
    LLM knowledge, the module's broadcast for the controls and the plain model) equals the module on rows."""
    result = _train(planted, name, variant)
    fields = result.artifact_fields(planted.split)
    loaded = load_artifact(save_artifact(tmp_path / "model", result.model, result.encoder, fields))
    trained_state, loaded_state = result.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(trained_state[key], loaded_state[key]) for key in trained_state)
    assert type(loaded.model.backbone) is type(result.model.backbone)

    lookup = SnapshotLookup(planted.snapshot) if loaded.model.needs_levels else None
    test_rows = planted.split.test
    in_memory = RequestScorer(in_memory_artifact(result.model, result.encoder, fields)).score_rows(test_rows, lookup)
    scorer = RequestScorer(loaded)
    assert np.array_equal(scorer.score_rows(test_rows, lookup), in_memory)

    frame, knowledge = _request(planted)
    rows = scorer.score_rows(frame, lookup)
    request = scorer.score(frame["scenario"][0], frame["user_id"][0], frame["item_id"].tolist(), knowledge)
    assert (scorer.request_path is not None) == (variant == "llm")
    assert np.ptp(rows) > 2e-4  # candidates are told apart, by 200 times the tolerance at least (one epoch)
    np.testing.assert_allclose(request, rows, atol=1e-6, rtol=0)
