"""Trainer guards and the train / evaluate / compare commands end to end on the synthetic dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math

import pytest
import torch
from fixtures_models import tiny_train_config, train_tiny_artifact, write_snapshot

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from offline.training.trainer import train
from shared.artifact import load_artifact
from shared.dataset.folder import read_dataset
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from tests.fixtures_models import write_planted_snapshot


@pytest.fixture(scope="module")
def synth(synth_dir, tmp_path_factory):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    kn = write_planted_snapshot(dataset, split, tmp_path_factory.mktemp("kn") / "knowledge")
    return dataset, split, kn


def test_snapshot_from_another_split_is_refused(synth, tmp_path):
    dataset, split, kn = synth
    snap = KnowledgeSnapshot(kn)
    leaky = write_snapshot(
        tmp_path / "leaky",
        split,
        dict(zip(snap.scenarios().ids, snap.scenarios().embeddings)),
        dict(zip(snap.users().ids, snap.users().embeddings)),
        dict(zip(snap.items().ids, snap.items().embeddings)),
        split_fingerprint="0" * 64,
    )
    with pytest.raises(UserFacingError, match="built on another split"):
        train(dataset, split, KnowledgeSnapshot(leaky), tiny_train_config(epochs=1))
    with pytest.raises(UserFacingError, match="needs --knowledge"):
        train(dataset, split, None, tiny_train_config(epochs=1))


def test_early_stopping_restores_the_best_epoch(synth):
    dataset, split, kn = synth
    r = train(dataset, split, KnowledgeSnapshot(kn), tiny_train_config(epochs=6, patience=0, lr=0.05))
    aucs = [h["valid_auc"] for h in r.history]
    assert r.best_epoch == aucs.index(max(aucs)) + 1
    assert r.metrics["valid"]["overall"]["auc"] == pytest.approx(max(aucs), rel=1e-5)
    assert len(r.history) <= 6 and all(h["samples_per_s"] > 0 for h in r.history)


def test_validation_checks_within_an_epoch_measure_without_changing_training(synth):
    """--checks-per-epoch 3: validation after each third of an epoch (cut at batch boundaries), the best check's
    weights kept; the model at each epoch's end is the one a single check per epoch trains."""
    dataset, split, kn = synth
    snap = KnowledgeSnapshot(kn)
    once = train(dataset, split, snap, tiny_train_config(epochs=2, patience=10))
    thrice = train(dataset, split, snap, tiny_train_config(epochs=2, patience=30, checks_per_epoch=3))
    assert [h["epoch"] for h in once.history] == [1, 2]
    assert [h["epoch"] for h in thrice.history] == [0.333, 0.667, 1, 1.333, 1.667, 2]
    ends = [h for h in thrice.history if isinstance(h["epoch"], int)]
    assert [h["valid_auc"] for h in ends] == [h["valid_auc"] for h in once.history]
    aucs = [h["valid_auc"] for h in thrice.history]
    assert thrice.best_epoch == thrice.history[aucs.index(max(aucs))]["epoch"]
    assert thrice.metrics["valid"]["overall"]["auc"] == pytest.approx(max(aucs), rel=1e-5)
    # patience counts epochs: with patience 1 and three checks per epoch, training stops at the fourth check in a
    # row without a gain (before the 30 checks of 10 epochs: lr 0.05 overfits this task within a few)
    stopped = train(dataset, split, snap, tiny_train_config(epochs=10, patience=1, lr=0.05, checks_per_epoch=3))
    best_at = [h["epoch"] for h in stopped.history].index(stopped.best_epoch)
    assert len(stopped.history) < 30 and len(stopped.history) - 1 - best_at == 4
    with pytest.raises(UserFacingError, match="checks_per_epoch must be an integer >= 1, got 0"):
        tiny_train_config(checks_per_epoch=0)


def test_norm_statistics_are_recounted_without_changing_training(synth):
    """--norm-stats-batches N: before each validation check STAR's eval statistics are recounted over N sampled
    train batches. The training is that of training without it (the recount neither steps the optimizer nor shifts
    the random streams); what validation measures differs, and the stored statistics are what a recount of the
    final weights gives. A backbone without such statistics trains byte-identically either way."""
    from offline.training import trainer as trainer_module

    dataset, split, kn = synth
    snap = KnowledgeSnapshot(kn)
    fixed = dict(epochs=3, patience=10, knowledge_dropout=0.2)
    kept = train(dataset, split, snap, tiny_train_config(norm_stats_batches=0, **fixed))
    recounted = train(dataset, split, snap, tiny_train_config(norm_stats_batches=3, **fixed))
    # every training loss bit-equal: the same batches, dropout masks and optimizer steps; what validation measured
    # differs (and so may the best epoch)
    assert [h["train_loss"] for h in kept.history] == [h["train_loss"] for h in recounted.history]
    assert [h["valid_auc"] for h in kept.history] != [h["valid_auc"] for h in recounted.history]
    stats = {"backbone.pn.running_mean", "backbone.pn.running_var"}
    # the stored statistics are a recount of the kept weights over the same sampled rows (without dropout, whose
    # masks would differ from those of the recount in training)
    config = tiny_train_config(norm_stats_batches=3, epochs=2, patience=10)
    b = train(dataset, split, snap, config).model.state_dict()
    prepared = trainer_module.prepare(dataset, split, snap, config)
    prepared.model.load_state_dict(b)
    n = len(prepared.data["train"])
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))[: 3 * config.batch_size]
    trainer_module.recount_statistics(prepared, rows, config.batch_size)
    again = prepared.model.state_dict()
    assert all(torch.allclose(again[k], b[k], atol=1e-6) for k in stats)
    plain = [
        train(dataset, split, snap, tiny_train_config(backbone="ple", norm_stats_batches=nsb, epochs=1))
        for nsb in (0, 3)
    ]
    first, second = (r.model.state_dict() for r in plain)
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(UserFacingError, match="norm_stats_batches must be an integer >= 0, got -1"):
        tiny_train_config(norm_stats_batches=-1)


def test_one_class_validation_stops_on_logloss(synth, caplog):
    """Validation AUC is NaN in every epoch when the validation rows have one class: early stopping falls back to
    validation logloss (and says so) instead of crashing on load_state_dict(None)."""
    dataset, split, _ = synth
    one_class = dataclasses.replace(split, valid=split.valid.assign(label=0.0))
    with caplog.at_level(logging.WARNING, logger="offline.training.trainer"):
        r = train(dataset, one_class, None, tiny_train_config(llm4msr=False, epochs=4, patience=4, lr=0.01))
    assert "early stopping uses validation logloss" in caplog.text
    assert r.early_stopping == "logloss"
    assert all(math.isnan(h["valid_auc"]) for h in r.history)
    losses = [h["valid_logloss"] for h in r.history]
    assert r.best_epoch == losses.index(min(losses)) + 1
    assert r.metrics["valid"]["overall"]["logloss"] == pytest.approx(min(losses), rel=1e-5)


def test_diverged_training_is_a_clear_error(synth):
    """Non-finite scores in every epoch: a one-line UserFacingError, not a traceback."""
    dataset, split, _ = synth
    with pytest.raises(UserFacingError, match=r"validation AUC was NaN at all 2 validation check\(s\).*lower --lr"):
        train(dataset, split, None, tiny_train_config(llm4msr=False, epochs=2, lr=1e20))


def test_cli_train_then_evaluate(synth_dir, synth, tmp_path, capsys):
    _, _, kn = synth
    out = tmp_path / "model"
    rc = llm4msr_cli.main(
        [
            "train",
            "--data",
            str(synth_dir),
            "--knowledge",
            str(kn),
            "--backbone",
            "star",
            "--levels",
            "scenario,user,item",
            "--placement",
            "both",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    trained = json.loads(capsys.readouterr().out)
    rc = llm4msr_cli.main(["evaluate", str(out), "--data", str(synth_dir), "--knowledge", str(kn), "--json"])
    assert rc == 0
    evaluated = json.loads(capsys.readouterr().out)
    for split in ("valid", "test"):
        assert evaluated["metrics"][split]["overall"] == pytest.approx(trained[split]["overall"], rel=1e-5)
        assert set(evaluated["metrics"][split]["per_scenario"]) == {"apparel", "books", "home"}
    # A model that reads LLM vectors cannot be evaluated without them.
    rc = llm4msr_cli.main(["evaluate", str(out), "--data", str(synth_dir)])
    assert rc == 2
    assert "pass --knowledge" in capsys.readouterr().err


def test_cli_plain_backbone_needs_no_knowledge(synth_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    rc = llm4msr_cli.main(
        [
            "train",
            "--data",
            str(synth_dir),
            "--backbone",
            "mmoe",
            "--no-llm4msr",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "test   overall" in capsys.readouterr().out
    cfg = load_artifact(out).config
    assert cfg.llm4msr is False and cfg.knowledge_source == "none" and cfg.knowledge_space_id is None


def test_compare_writes_report(synth_dir, synth, tmp_path):
    _, _, kn = synth
    out = tmp_path / "report"
    args = [
        "compare",
        "--data",
        str(synth_dir),
        "--knowledge",
        str(kn),
        "--seeds",
        "1",
        "--backbones",
        "star",
        "--variants",
        "plain,llm_su,id_sui",
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert llm4msr_cli.main(args) == 0
    report = (out / "report.md").read_text()
    assert "| star | plain | 1 |" in report and "+LLM4MSR (scenario,user)" in report and "+ID control" in report
    assert (out / "per_scenario_auc.png").stat().st_size > 1000
    assert (out / "scenario_similarity.png").stat().st_size > 1000
    assert len(list((out / "runs").glob("*.json"))) == 3
    # Re-running skips finished runs (resumable in pieces) and rebuilds the report.
    mtime = (out / "runs" / "star__plain__s0.json").stat().st_mtime
    assert llm4msr_cli.main(args) == 0
    assert (out / "runs" / "star__plain__s0.json").stat().st_mtime == mtime


def test_train_tiny_artifact_helper(synth_dir, tmp_path):
    # The planted snapshot the helper writes has no fit user vectors: the full-history protocol.
    path = train_tiny_artifact(
        synth_dir,
        None,
        tmp_path / "tiny",
        backbone="ple",
        levels=("scenario", "user", "item"),
        user_knowledge="full-history",
    )
    artifact = load_artifact(path)
    assert artifact.config.backbone == "ple"
    assert artifact.config.levels == ["scenario", "user", "item"]
    assert artifact.config.knowledge_space_id is not None


def test_embedding_init_std_is_a_training_option(synth_dir, synth, tmp_path):
    """--embed-init-std sets the field embeddings' init and is stored with the training settings; a stored config
    without it (trained before it existed) reads as the init of that time."""
    from offline.training.cli import TRAINING_FLAGS
    from offline.training.config import TrainConfig, fill_absent
    from offline.training.trainer import build_model
    from shared.models.features import FeatureEncoder

    dataset, split, _ = synth
    encoder = FeatureEncoder.fit(dataset, split.train)
    for std in (1e-3, 0.2):
        model = build_model(tiny_train_config(llm4msr=False, embed_init_std=std), encoder, 0)
        assert model.config.embed_init_std == std
        assert float(model.embedding.weight.detach().std()) == pytest.approx(std, rel=0.05)

    parser = argparse.ArgumentParser()
    TRAINING_FLAGS.add_to(parser)
    assert TRAINING_FLAGS.values(parser.parse_args(["--embed-init-std", "0.001"]))["embed_init_std"] == 0.001

    out = tmp_path / "model"
    args = ["train", "--data", str(synth_dir), "--no-llm4msr", "--embed-init-std", "0.001", "--epochs", "1"]
    assert llm4msr_cli.main([*args, "--threads", "1", "--embed-dim", "8", "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["train"]["embed_init_std"] == 0.001 and stored["model"]["embed_init_std"] == 0.001
    old = {k: v for k, v in stored["train"].items() if k in TrainConfig.flat_keys() - {"embed_init_std"}}
    assert TrainConfig.from_flat(fill_absent(old)).embed_init_std == 0.05


def test_knowledge_pathway_learns_at_its_own_rate(synth):
    """--knowledge-lr-scale: the wrapper's parameters step at lr x scale, the embeddings and the backbone at lr (on
    Adam's first step every parameter moves by about its group's learning rate); scale 1 and the plain backbone keep
    one group; a stored config without the field reads as scale 1; a non-positive scale is refused by name."""
    import torch

    from offline.training.config import TrainConfig, fill_absent
    from offline.training.trainer import build_model, make_optimizer
    from shared.models.features import FeatureEncoder

    dataset, split, _ = synth
    encoder = FeatureEncoder.fit(dataset, split.train)

    def first_step(scale: float, llm4msr: bool = True) -> tuple[int, float, float]:
        torch.manual_seed(0)
        cfg = tiny_train_config(llm4msr=llm4msr, lr=1e-3, knowledge_lr_scale=scale)
        model = build_model(cfg, encoder, 16)
        optim = make_optimizer(model, cfg)
        wrapper = {id(p) for p in model.wrapper.parameters()} if model.wrapper is not None else set()
        before = {id(p): p.detach().clone() for p in model.parameters()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optim.step()
        moved = {id(p): float((p.detach() - before[id(p)]).abs().max()) for p in model.parameters()}
        inside = max((m for i, m in moved.items() if i in wrapper), default=0.0)
        outside = max(m for i, m in moved.items() if i not in wrapper)
        return len(optim.param_groups), inside, outside

    groups, inside, outside = first_step(3.0)
    assert groups == 2
    assert inside == pytest.approx(3e-3, rel=1e-3) and outside == pytest.approx(1e-3, rel=1e-3)
    groups, inside, outside = first_step(1.0)
    assert groups == 1 and inside == pytest.approx(1e-3, rel=1e-3) and outside == pytest.approx(1e-3, rel=1e-3)
    groups, inside, outside = first_step(3.0, llm4msr=False)
    assert groups == 1 and inside == 0.0 and outside == pytest.approx(1e-3, rel=1e-3)

    assert TrainConfig.from_flat(fill_absent({"backbone": "ple"})).knowledge_lr_scale == 1.0
    for bad in (0.0, -2.0, float("inf")):
        with pytest.raises(UserFacingError, match="knowledge_lr_scale must be a finite number > 0"):
            tiny_train_config(knowledge_lr_scale=bad)
