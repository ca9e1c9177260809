"""Traced request graphs (shared/request_graphs.py): every backbone, with and without LLM4MSR, scores a request
through its graph exactly as the eager forward does, for any scenario, candidate count, knowledge layout and
missing item vector; a forward whose trace would be wrong is caught by the check and stays eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from shared.models.backbones import backbone_names
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.llm4msr import GATE_STEP_SCALE, LLM4MSRConfig
from shared.request_graphs import RequestGraphs

DIM, USERS, ITEMS, SCENARIOS = 40, 50, 80, 3


def _model(backbone: str, levels: list[str] | None) -> CTRModel:
    """A model with trained-looking weights (gates open): every path of the forward contributes."""
    torch.manual_seed(0)
    wrapper = LLM4MSRConfig(levels=levels, knowledge_dim=DIM, reduce_dim=16) if levels else None
    cfg = ModelConfig(
        fields=[("user_id", USERS), ("item_id", ITEMS), ("scenario", SCENARIOS + 1)],
        n_scenarios=SCENARIOS,
        backbone=backbone,
        llm4msr=wrapper,
    )
    model = CTRModel(cfg)
    model.train()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    x = torch.stack([torch.randint(0, USERS, (256,)), torch.randint(0, ITEMS, (256,)), torch.randint(0, 3, (256,))], 1)
    if model.wrapper is not None:
        for stored in model.wrapper.gate.values():
            stored.data.uniform_(0.3, 1.5).div_(GATE_STEP_SCALE)
        for level in levels:
            model.wrapper.fit_reduction(level, torch.randn(200, DIM) * 3 + 1)
    model(x, x[:, 2], {lv: torch.randn(256, DIM) for lv in levels or []})  # running statistics (STAR)
    model.eval().requires_grad_(False)
    return model


def _request(n: int, scenario: int, levels: list[str], layout: str, model: CTRModel, gen: torch.Generator):
    fields = torch.stack(
        [torch.full((n,), 3), torch.randint(0, ITEMS, (n,), generator=gen), torch.full((n,), scenario)], dim=1
    )
    kn = {lv: torch.randn(1, DIM, generator=gen) for lv in ("scenario", "user") if lv in levels}
    item_reduced = None
    if "item" in levels:
        raw = torch.randn(n, DIM, generator=gen)
        raw[n // 2] = float("nan")  # an unknown item: the level's average
        if layout == "reduced":
            item_reduced = model.wrapper.reduce("item", raw)
            item_reduced[n // 2] = float("nan")
        else:
            kn["item"] = raw
    return fields, torch.full((n,), scenario), kn, item_reduced


@pytest.mark.parametrize("backbone", backbone_names())
@pytest.mark.parametrize("levels", [None, ["scenario", "user"], ["scenario", "user", "item"]])
def test_traced_graphs_score_like_the_eager_forward(backbone, levels):
    model = _model(backbone, levels)
    path = model.wrapper.fold_for_requests() if model.wrapper is not None else None

    def eager(fields, scenario, knowledge, item_reduced):
        if path is None:
            return model(fields, scenario, knowledge)
        return model.forward_request(fields, scenario, path, knowledge, item_reduced)

    graphs = RequestGraphs(eager)
    gen = torch.Generator().manual_seed(1)
    layouts = ["raw", "reduced"] if levels and "item" in levels else ["raw"]
    for _ in range(2):  # the second round runs on graphs built in the first
        for scenario in range(SCENARIOS):
            for layout in layouts:
                for n in (100, 1, 7, 501):
                    fields, scen, kn, item_reduced = _request(n, scenario, levels or [], layout, model, gen)
                    with torch.inference_mode():
                        expected = eager(fields, scen, kn, item_reduced)
                        got = graphs(fields, scen, kn, item_reduced)
                    assert got.shape == (n,) and torch.isfinite(got).all()
                    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert len(graphs.graphs) == SCENARIOS * len(layouts) and all(graphs.graphs.values())


def test_a_trace_that_would_be_wrong_stays_eager(caplog):
    """A Python branch on the values (here: whether an item vector is missing) is recorded as a constant by a
    trace; the check's missing-item input catches it, and that key keeps the eager forward."""

    def forward(fields, scenario, knowledge, item_reduced):
        if bool(torch.isnan(item_reduced).any()):
            return torch.nan_to_num(item_reduced, nan=0.0).sum(1) * 0.0
        return item_reduced.sum(1) + fields[:, 0].float()

    graphs = RequestGraphs(forward)
    fields, scen = torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    rows = torch.arange(10.0).reshape(5, 2)
    with caplog.at_level(logging.WARNING, logger="shared.request_graphs"):
        out = graphs(fields, scen, {}, rows)
    assert graphs.graphs == {(0, ("item_reduced",)): False}
    assert "kept eager" in caplog.text
    np.testing.assert_allclose(out.numpy(), rows.sum(1).numpy())
    rows[1, 0] = float("nan")
    np.testing.assert_allclose(graphs(fields, scen, {}, rows).numpy(), np.zeros(5))  # still the eager branch


def test_ranker_warm_up_builds_every_graph(tmp_path):
    """The served model's graphs (every scenario; raw and reduced item layouts) exist and check out before the
    first request, and scores equal the eager ranker's."""
    from fixtures_serving import build_world

    from online.ranker import Ranker
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestKnowledge

    world = build_world(tmp_path, variants=("llm4msr-item",))
    traced = Ranker.load(world.artifacts["llm4msr-item"])
    eager = Ranker.load(world.artifacts["llm4msr-item"], traced=False)
    assert eager.scorer.graphs is None
    built = traced.scorer.graphs.graphs
    layouts = {("scenario", "user", "item"), ("scenario", "user", "item_reduced")}
    assert {(k[0], k[1]) for k in built} == {(s, lay) for s in range(len(world.scenarios)) for lay in layouts}
    assert all(built.values())
    snap = KnowledgeSnapshot(world.knowledge_root)
    items = world.items[:40]
    vecs, _ = snap.items().lookup(items)
    for k, scenario in enumerate(world.scenarios):
        kn = RequestKnowledge(snap.scenarios().embeddings[k], snap.users().embeddings[k], vecs)
        np.testing.assert_allclose(
            traced.score(scenario, world.users[k], items, kn),
            eager.score(scenario, world.users[k], items, kn),
            atol=1e-6,
        )
