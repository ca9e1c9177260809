"""Backbones and the LLM4MSR wrapper learn synthetic tasks whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_models import latent_snapshot, latent_task, tiny_train_config

from offline.data.split import SplitConfig, make_split
from offline.training.metrics import auc, gauc, logloss
from offline.training.trainer import train
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.models.backbones import backbone_names, build_backbone
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.llm4msr import GATE_STEP_SCALE, LLM4MSRConfig

BACKBONE_NAMES = sorted(backbone_names())


def test_metrics_known_values():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = rng.random(500) + y * 0.5
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert auc(np.ones(3), np.arange(3)) != auc(np.ones(3), np.arange(3))  # NaN with one class
    # GAUC: user a ranks perfectly (1.0, 2 rows), user b inverted (0.0, 4 rows), user c one class (skipped).
    users = ["a", "a", "b", "b", "b", "b", "c"]
    labels = np.array([1, 0, 1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.1, 0.2, 0.8, 0.9, 0.5])
    assert gauc(users, labels, scores) == pytest.approx((2 * 1.0 + 4 * 0.0) / 6)
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_backbone_eval_is_batch_independent(name):
    torch.manual_seed(0)
    model = build_backbone(name, {}, 24, 3)
    x, s = torch.randn(64, 24), torch.randint(0, 3, (64,))
    model.train()
    for _ in range(3):  # updates STAR's running statistics
        model(x, s).sum().backward()
    model.eval()
    with torch.no_grad():
        full = model(x, s)
        single = torch.stack([model(x[i : i + 1], s[i : i + 1])[0] for i in range(8)])
        shuffled = model(x.flip(0), s.flip(0)).flip(0)
    assert torch.allclose(full[:8], single, atol=1e-6)
    assert torch.allclose(full, shuffled, atol=1e-6)


def test_star_per_scenario_cache_follows_parameter_changes():
    """STAR's one-scenario path reuses fused weights without autograd; any in-place change (an optimizer step,
    load_state_dict, new running statistics) must invalidate them, and a copy must not share them."""
    import copy

    torch.manual_seed(0)
    model = build_backbone("star", {}, 24, 3)
    x, one = torch.randn(16, 24), torch.full((16,), 1)
    mixed = torch.randint(0, 3, (16,))
    mixed[0], mixed[1] = 0, 2  # at least two scenarios: the general (uncached) path

    def general(m):  # the same rows scored through the path that fuses nothing
        rows = torch.cat([x, x]), torch.cat([one, mixed])
        return m(*rows)[:16]

    model.eval()
    with torch.no_grad():
        first = model(x, one)
        assert torch.allclose(first, general(model), atol=1e-6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x, mixed).sum().backward()  # also updates the running statistics in place
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = model(x, one)
        assert not torch.allclose(after_step, first, atol=1e-4)
        assert torch.allclose(after_step, general(model), atol=1e-6)
        clone = copy.deepcopy(model)
        fresh = build_backbone("star", {}, 24, 3).eval()
        model.load_state_dict(fresh.state_dict())
        assert torch.allclose(model(x, one), fresh(x, one), atol=1e-6)
        assert torch.allclose(clone(x, one), after_step, atol=1e-6)
    # With autograd on, the one-scenario path still reaches the parameters.
    model.zero_grad()
    model(x, one).sum().backward()
    assert model.layers[0].w_s.grad is not None and model.layers[0].w_s.grad[1].abs().sum() > 0


def test_star_norm_recount_averages_the_batches_it_sees():
    """Between recount_start and recount_stop, partitioned normalization's eval statistics become the plain average
    of the train-mode batches per scenario (the exponential average of training forgets all but the last ~10);
    afterwards updates follow the momentum again. A scenario absent from every batch keeps its statistics."""
    torch.manual_seed(0)
    model = build_backbone("star", {}, 6, 3)
    assert model.recountable_statistics and not build_backbone("ple", {}, 6, 3).recountable_statistics
    pn = model.pn
    before = pn.running_mean[2].clone(), pn.running_var[2].clone()
    batches = [(torch.randn(32, 6) * (k + 1) + k, torch.randint(0, 2, (32,))) for k in range(4)]
    model.train()
    pn.recount_start()
    with torch.no_grad():
        for x, scenario in batches:
            model(x, scenario)
    pn.recount_stop()
    for s in (0, 1):
        rows = [x[scenario == s] for x, scenario in batches]
        mean = torch.stack([r.mean(0) for r in rows]).mean(0)
        var = torch.stack([r.var(0, unbiased=True) for r in rows]).mean(0)
        assert torch.allclose(pn.running_mean[s], mean, atol=1e-5)
        assert torch.allclose(pn.running_var[s], var, atol=1e-4)
    assert torch.equal(pn.running_mean[2], before[0]) and torch.equal(pn.running_var[2], before[1])
    recounted = pn.running_mean[0].clone()
    x, scenario = batches[0]
    with torch.no_grad():
        model(x, scenario)
    expected = recounted.lerp(x[scenario == 0].mean(0), pn.momentum)
    assert torch.allclose(pn.running_mean[0], expected, atol=1e-6)


def test_unknown_backbone_and_levels_are_refused():
    with pytest.raises(UserFacingError, match="unknown backbone"):
        build_backbone("nope", {}, 8, 2)
    with pytest.raises(UserFacingError, match="levels must not be empty"):
        LLM4MSRConfig(levels=[])
    with pytest.raises(UserFacingError, match=r"unknown knowledge level\(s\) \['items'\]"):
        LLM4MSRConfig(levels=["items"])
    assert LLM4MSRConfig(levels=["item"]).meta_levels == []  # item alone: no meta layers, a valid ablation
    with pytest.raises(UserFacingError, match="invalid star parameters.*no_such_param"):
        build_backbone("star", {"no_such_param": 1}, 8, 2)


@pytest.fixture(scope="module")
def flip_task():
    """Clicks depend on an item effect whose sign flips between the two scenarios."""
    dataset, _, _ = latent_task(users=200, items=40, rows_per_user=30, scenario_flip=True, seed=3)
    return dataset, make_split(dataset, SplitConfig())


def _one_scenario(dataset):
    """The same rows with the scenario erased: a model cannot know which way an item's effect points."""
    from dataclasses import replace

    inter = dataset.interactions.copy()
    inter["scenario"] = "alpha"
    return replace(dataset, interactions=inter, scenarios=dataset.scenarios.iloc[:1], _fingerprint=None)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_backbone_learns_scenario_dependent_task(flip_task, name):
    dataset, split = flip_task
    cfg = tiny_train_config(backbone=name, llm4msr=False, epochs=8)
    aware = train(dataset, split, None, cfg).metrics["test"]["overall"]["auc"]
    blind_ds = _one_scenario(dataset)
    blind = train(blind_ds, make_split(blind_ds, SplitConfig()), None, cfg).metrics["test"]["overall"]["auc"]
    assert aware > 0.7, aware
    assert aware > blind + 0.1, (aware, blind)


@pytest.fixture(scope="module")
def affinity_task(tmp_path_factory):
    """Clicks depend on <user factor, item factor>; the snapshot holds noisy rotated factors (the known answer)."""
    dataset, u, v = latent_task(users=400, items=60, rows_per_user=24, seed=5)
    split = make_split(dataset, SplitConfig())
    snap = KnowledgeSnapshot(latent_snapshot(dataset, split, u, v, tmp_path_factory.mktemp("kn")))
    return dataset, split, snap


@pytest.mark.parametrize(
    ("name", "gate", "placement", "margin"),
    # The meta networks as in the paper (ungated, at the bottom of and in parallel to the backbone) on every
    # backbone; the gated wrapper on the two backbones of the goal (its gates must open for the user level: a
    # smaller margin over the control on this small task, where gated runs vary more from seed to seed); the
    # default placement (parallel only) gated on PLE and ungated on Shared-Bottom. Here the click is the user's
    # factor matched against the item's ID, which the bottom path hands to the whole backbone; the parallel path
    # alone learns it more slowly, on STAR most (margin over the control 0.01-0.02 even at 20 epochs, where STAR's
    # IDs alone reach 0.67), so STAR's cases are at both.
    [(name, "none", "both", 0.04) for name in BACKBONE_NAMES]
    + [("star", "scalar", "both", 0.02), ("ple", "scalar", "both", 0.02)]
    + [("ple", "scalar", "parallel", 0.04), ("shared_bottom", "none", "parallel", 0.04)],
)
def test_wrapper_learns_from_user_knowledge(affinity_task, name, gate, placement, margin):
    dataset, split, snap = affinity_task
    # The latent factors do not depend on any history, so nothing can leak: every train row reads them (under
    # leak-free the early ~70% would read the cold-start vector, too few rows for this small task). Patience 3:
    # gated STAR's validation AUC plateaus at epochs 3-6 before it climbs to ~0.71 by epoch 10 (with its
    # normalization statistics recounted; the running averages hid the plateau behind epoch-to-epoch noise).
    base = dict(
        backbone=name,
        epochs=10,
        patience=3,
        levels=["scenario", "user"],
        gate=gate,
        placement=placement,
        user_knowledge="full-history",
    )
    with_llm = train(dataset, split, snap, tiny_train_config(knowledge_source="llm", **base))
    with_random = train(dataset, split, snap, tiny_train_config(knowledge_source="random", **base))
    a_llm = with_llm.metrics["test"]["overall"]["auc"]
    a_rnd = with_random.metrics["test"]["overall"]["auc"]
    assert a_llm > 0.62, a_llm
    assert a_llm > a_rnd + margin, (a_llm, a_rnd)
    if gate != "none":
        # The useful level opened (gates start at 0 and their decay pulls them back), and further than the same
        # level fed random vectors: the gate follows usefulness. How far it opens varies with the CPU's float
        # rounding (STAR: 0.08 on an AMD EPYC, above 0.1 on an Intel Cascade Lake), hence the bound against the
        # control rather than a fixed one alone.
        g_llm = with_llm.model.wrapper.gate_strength()["user"]
        g_rnd = with_random.model.wrapper.gate_strength()["user"]
        assert g_llm > 0.05 and g_llm > g_rnd, (g_llm, g_rnd)


def test_item_level_uses_user_item_interaction(affinity_task):
    dataset, split, snap = affinity_task
    su = train(dataset, split, snap, tiny_train_config(levels=["scenario", "user"], epochs=10, patience=2))
    sui = train(dataset, split, snap, tiny_train_config(levels=["scenario", "user", "item"], epochs=10, patience=2))
    assert sui.metrics["test"]["overall"]["auc"] > 0.75
    assert sui.metrics["test"]["overall"]["auc"] > su.metrics["test"]["overall"]["auc"] + 0.02


def test_request_broadcast_equals_per_row_knowledge():
    """One request's [1, d] scenario/user vectors give the same logits as the same vectors repeated per row."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        fields=[("user_id", 10), ("item_id", 20), ("scenario", 4)],
        n_scenarios=3,
        backbone="ple",
        llm4msr=LLM4MSRConfig(levels=["scenario", "user", "item"], knowledge_dim=24),
    )
    model = CTRModel(cfg).eval()
    with torch.no_grad():
        for alpha in model.wrapper.gate.values():  # open the gates (closed at init: knowledge would not matter)
            alpha.fill_(1.0)
    fields = torch.stack([torch.full((6,), 3), torch.arange(6), torch.full((6,), 2)], dim=1)
    scen = torch.full((6,), 1)
    ks, ku, ki = torch.randn(1, 24), torch.randn(1, 24), torch.randn(6, 24)
    with torch.no_grad():
        once = model(fields, scen, {"scenario": ks, "user": ku, "item": ki})
        rows = model(fields, scen, {"scenario": ks.expand(6, -1), "user": ku.expand(6, -1), "item": ki})
        other_user = model(fields, scen, {"scenario": ks, "user": torch.randn(1, 24), "item": ki})
    assert torch.allclose(once, rows, atol=1e-6)
    assert not torch.allclose(once, other_user, atol=1e-4)


@pytest.mark.parametrize(
    "levels",
    [
        ["scenario"],
        ["user"],
        ["scenario", "user"],
        ["scenario", "user", "item"],
        ["user", "item"],
        ["scenario", "item"],
    ],
)
@pytest.mark.parametrize("placement", ["bottom", "parallel", "both"])
def test_folded_request_path_equals_the_wrapper(levels, placement):
    """The serving fold (reduction, projection and hypernetworks collapsed into a few matrices) is the same function
    as the trained wrapper, including missing (NaN) vectors and items passed already reduced."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        fields=[("user_id", 50), ("item_id", 80), ("scenario", 4)],
        n_scenarios=3,
        backbone="star",
        llm4msr=LLM4MSRConfig(levels=levels, placement=placement, knowledge_dim=40, reduce_dim=16),
    )
    model = CTRModel(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():  # trained-looking weights: the zero-initialised bottom must matter too
            param.normal_(0, 0.3)
        for stored in model.wrapper.gate.values():  # the default scalar gates, closed at init: opened (alpha 0.3-1.5)
            stored.uniform_(0.3, 1.5).div_(GATE_STEP_SCALE)  # every gate mode: tests/test_gates.py
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
        other_user = model.forward_request(fields, scen, path, {**raw, "user": torch.randn(1, 40)})
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero logits
    torch.testing.assert_close(folded, expected, atol=2e-5, rtol=1e-5)
    if "item" in levels:
        reduced = model.wrapper.reduce("item", raw["item"])
        reduced[2] = float("nan")  # an unknown item passed reduced: the level's average, as for a raw NaN row
        torch.testing.assert_close(
            model.forward_request(fields, scen, path, raw, reduced), expected, atol=2e-5, rtol=1e-5
        )
    if "user" in levels:
        assert not torch.allclose(other_user, expected, atol=1e-4)


def test_fold_is_skipped_for_controls():
    cfg = ModelConfig(
        fields=[("user_id", 10), ("item_id", 20), ("scenario", 4)],
        n_scenarios=3,
        llm4msr=LLM4MSRConfig(levels=["scenario", "user"], knowledge_source="id"),
    )
    assert CTRModel(cfg).wrapper.fold_for_requests() is None


def test_module_apply_reaches_every_meta_layer():
    """nn.Module.apply(fn) works on an LLM4MSR model (no submodule hides it) and visits the meta layers."""
    from shared.models.llm4msr import LowRankMetaLayer

    cfg = ModelConfig(
        fields=[("user_id", 10), ("item_id", 20), ("scenario", 4)],
        n_scenarios=3,
        llm4msr=LLM4MSRConfig(levels=["scenario", "user", "item"], knowledge_dim=24),
    )
    model = CTRModel(cfg)
    visited: list[type] = []

    def zero_linear(module: torch.nn.Module) -> None:
        visited.append(type(module))
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)

    assert model.apply(zero_linear) is model
    assert visited.count(LowRankMetaLayer) == 2  # the scenario- and user-level meta layers
    assert all(int(torch.count_nonzero(layer.u.weight)) == 0 for layer in model.wrapper.meta)


def test_reduction_reads_a_reduced_knowledge_space_as_the_llm_vectors():
    """A model trained on a reduced space (the build's PCA) fits its own reduction through that PCA: it then maps
    each vector as it maps the LLM's vector. Standardizing the space's decorrelated components directly whitens
    them, and its PCA then keeps other directions."""
    from offline.knowledge.build_reduce import apply_reducer, fit_pca

    gen = torch.Generator().manual_seed(0)
    # LLM-like vectors: correlated dimensions of very different scales, one with a large constant offset.
    raw = (torch.randn(600, 40, generator=gen) @ torch.randn(40, 40, generator=gen)) * torch.linspace(0.2, 5, 40)
    raw[:, 3] += 30.0
    mean, comps = fit_pca(raw.numpy(), 40)  # a full-rank space: mapping back is exact
    stored = torch.from_numpy(apply_reducer(raw.numpy(), mean, comps))

    def reduced(sample: torch.Tensor, dim: int, space_reducer=None) -> torch.Tensor:
        cfg = LLM4MSRConfig(levels=["item"], knowledge_dim=dim, reduce_dim=8)
        model = CTRModel(
            ModelConfig(fields=[("user_id", 5), ("item_id", 5), ("scenario", 2)], n_scenarios=1, llm4msr=cfg)
        )
        model.wrapper.fit_reduction("item", sample, space_reducer)
        return model.wrapper.reduce("item", sample)

    def gram(x: torch.Tensor) -> torch.Tensor:  # invariant to the components' signs
        return x[:50] @ x[:50].T

    in_llm_space = reduced(raw, 40)
    through = reduced(stored, 40, (torch.from_numpy(mean), torch.from_numpy(comps)))
    torch.testing.assert_close(gram(through), gram(in_llm_space), atol=1e-3 * gram(in_llm_space).abs().max(), rtol=0)
    naive = reduced(stored, 40)
    assert (gram(naive) - gram(in_llm_space)).abs().max() > 0.1 * gram(in_llm_space).abs().max()
