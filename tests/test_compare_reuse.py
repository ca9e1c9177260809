"""`compare` reuses a finished run only when made with the same settings; `evaluate` refuses leaky knowledge.

Both through the CLI, on the small synthetic dataset folder and planted knowledge (no LLM).
"""

from __future__ import annotations

import json
import logging

import pytest
from fixtures_models import train_tiny_artifact, write_planted_snapshot

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from shared.dataset.folder import read_dataset


@pytest.fixture(scope="module")
def synth(synth_dir, tmp_path_factory):
    dataset = read_dataset(synth_dir)
    split = make_split(dataset, SplitConfig())
    root = tmp_path_factory.mktemp("kn")
    kn = write_planted_snapshot(dataset, split, root / "knowledge")
    return dataset, split, kn, root


def _compare(synth_dir, kn, out, *extra: str) -> int:
    args = ["compare", "--data", str(synth_dir), "--knowledge", str(kn), "--seeds", "1", "--backbones", "star"]
    args += ["--batch-size", "512", "--threads", "1", "--out", str(out), *extra]
    return llm4msr_cli.main(args)


def _compare_log(caplog, synth_dir, kn, out, *extra: str) -> str:
    """Runs compare (which must succeed) and returns what it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="offline.training.compare"):
        assert _compare(synth_dir, kn, out, *extra) == 0
    return caplog.text


def _written_before(out, runs: tuple[str, ...], *keys: str) -> None:
    """Makes the run records as an older version wrote them: without the config fields it did not have."""
    for name in runs:
        file = out / "runs" / name
        record = json.loads(file.read_text())
        for key in keys:
            record["config"].pop(key)
        file.write_text(json.dumps(record))


def _set_test_auc(file, value: float) -> None:
    record = json.loads(file.read_text())
    record["metrics"]["test"]["overall"]["auc"] = value
    file.write_text(json.dumps(record))


def test_compare_reuses_only_runs_made_with_the_same_settings(synth_dir, synth, tmp_path, caplog):
    _, _, kn, root = synth
    out = tmp_path / "report"
    plain, llm = out / "runs" / "star__plain__s0.json", out / "runs" / "star__llm_su__s0.json"
    assert _compare(synth_dir, kn, out, "--variants", "plain,llm_su", "--epochs", "1") == 0
    report = (out / "report.md").read_text()
    assert "## Test NDCG@10" in report and "## Test Recall@10" in report and "NDCG@10 overall" in report
    assert (out / "per_scenario_ndcg10.png").stat().st_size > 1000
    first = json.loads(plain.read_text())
    assert first["config"]["epochs"] == 1 and first["top_k"] == [5, 10, 20]
    assert {"ndcg@10", "recall@10", "mrr@10", "topk_users"} <= set(first["metrics"]["test"]["per_scenario"]["books"])

    # Same settings: reused, not retrained. A marker in the stored numbers proves the report reads the old run.
    _set_test_auc(plain, 0.4321)
    mtime = plain.stat().st_mtime_ns
    log = _compare_log(caplog, synth_dir, kn, out, "--variants", "plain,llm_su", "--epochs", "1")
    assert "reuse star__plain__s0.json (same settings)" in log and "recompute" not in log
    assert plain.stat().st_mtime_ns == mtime
    assert "| star | plain | 1 | 0.4321 |" in (out / "report.md").read_text()

    # Other epochs: recomputed, said so, and the report holds the new numbers only.
    log = _compare_log(caplog, synth_dir, kn, out, "--variants", "plain", "--epochs", "2")
    assert "recompute star__plain__s0.json: settings changed: epochs 1 -> 2" in log
    second = json.loads(plain.read_text())
    assert second["config"]["epochs"] == 2 and len(second["history"]) == 2
    report = (out / "report.md").read_text()
    assert "0.4321" not in report
    assert f"| star | plain | 1 | {second['metrics']['test']['overall']['auc']:.4f} |" in report
    # The llm_su run (1 epoch) was not part of this invocation: left out of the report, and listed.
    assert "+LLM4MSR (scenario,user)" not in report
    assert "- star__llm_su__s0 (epochs 1 -> 2)" in report
    assert "report leaves out star__llm_su__s0" in log
    assert json.loads(llm.read_text())["config"]["epochs"] == 1  # kept on disk, untouched

    # --report-only with the first settings: the llm_su run comes back, the 2-epoch plain run is left out.
    assert _compare(synth_dir, kn, out, "--epochs", "1", "--report-only") == 0
    report = (out / "report.md").read_text()
    assert "+LLM4MSR (scenario,user)" in report and "| star | plain |" not in report

    # Another knowledge snapshot (another space): nothing matches, a clear error instead of a stale report.
    dataset, split, _, _ = synth
    other = write_planted_snapshot(dataset, split, root / "other-kn", model="another-llm")
    assert _compare(synth_dir, other, out, "--epochs", "1", "--report-only") == 2


def test_compare_top_k_is_configurable_and_part_of_the_settings(synth_dir, synth, tmp_path, capsys):
    _, _, kn, _ = synth
    out = tmp_path / "topk"
    assert _compare(synth_dir, kn, out, "--variants", "plain", "--epochs", "1", "--top-k", "3,7") == 0
    record = json.loads((out / "runs" / "star__plain__s0.json").read_text())
    assert record["top_k"] == [3, 7]
    assert {"ndcg@3", "ndcg@7"} <= set(record["metrics"]["test"]["overall"])
    assert "ndcg@10" not in record["metrics"]["test"]["overall"]
    assert "## Test NDCG@7" in (out / "report.md").read_text()  # the K nearest 10
    with pytest.raises(SystemExit):
        _compare(synth_dir, kn, out, "--top-k", "0,x")
    assert "argument --top-k: expected a comma list of positive integers" in capsys.readouterr().err


def test_evaluate_refuses_knowledge_built_on_another_split(synth_dir, synth, tmp_path, capsys):
    dataset, split, kn, root = synth
    model = train_tiny_artifact(synth_dir, kn, tmp_path / "model", epochs=1)
    # A newer snapshot built with other split options: its user prompts saw this split's test interactions.
    other_split = make_split(dataset, SplitConfig(valid_ratio=0.05, test_ratio=0.05))
    leaky = write_planted_snapshot(dataset, other_split, root / "leaky")
    rc = llm4msr_cli.main(["evaluate", str(model), "--data", str(synth_dir), "--knowledge", str(leaky)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: knowledge snapshot") and "was built on another split" in err
    assert len(err.splitlines()) == 1

    rc = llm4msr_cli.main(["evaluate", str(model), "--data", str(synth_dir), "--knowledge", str(kn), "--json"])
    assert rc == 0
    test = json.loads(capsys.readouterr().out)["metrics"]["test"]
    assert {"auc", "gauc", "recall@5", "ndcg@10", "mrr@20", "topk_users"} <= set(test["overall"])
    assert 0 < test["overall"]["topk_users"] and 0.0 <= test["per_scenario"]["books"]["ndcg@10"] <= 1.0
    rc = llm4msr_cli.main(["evaluate", str(model), "--data", str(synth_dir), "--knowledge", str(kn), "--top-k", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NDCG@2" in text and "NDCG@10" not in text

    # A model that reads no knowledge cannot leak through it: the same snapshot is accepted.
    plain = train_tiny_artifact(synth_dir, None, tmp_path / "plain", llm4msr=False, epochs=1)
    assert llm4msr_cli.main(["evaluate", str(plain), "--data", str(synth_dir), "--knowledge", str(leaky)]) == 0


def test_variant_sets_and_the_last_pooling_snapshot(synth_dir, synth, tmp_path, capsys):
    from offline.training.compare import ABLATION_VARIANTS, VARIANTS, select_variants

    assert select_variants(None, False, None) == ("plain", "auto", "id_sui", "random_sui")
    with_last = select_variants(None, True, "kn-last")
    assert with_last[:4] == ("plain", "auto", "id_sui", "random_sui") and set(ABLATION_VARIANTS) <= set(with_last)
    without_last = select_variants(["plain"], True, None)
    assert "llm_su_last" not in without_last and "llm_i" in without_last and "llm_sui_rd32" in without_last
    assert VARIANTS["llm_su_full_history"].values["user_knowledge"] == "full-history"
    assert VARIANTS["llm_sui_ungated"].values["gate"] == "none" and VARIANTS["plain"].levels is None

    dataset, split, kn, root = synth
    out = tmp_path / "last"
    assert _compare(synth_dir, kn, out, "--variants", "llm_su_last", "--epochs", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "variant llm_su_last needs --knowledge-last DIR" in err
    last = write_planted_snapshot(dataset, split, root / "kn-last", version="v2")
    assert (
        _compare(synth_dir, kn, out, "--variants", "llm_su_last", "--epochs", "1", "--knowledge-last", str(last)) == 0
    )
    record = json.loads((out / "runs" / "star__llm_su_last__s0.json").read_text())
    assert record["knowledge_version"] == "v2" and record["config"]["levels"] == ["scenario", "user"]
    report = (out / "report.md").read_text()
    assert "--knowledge-last Knowledge snapshot v2" in report and "+LLM4MSR (s,u) last pooling" in report


def test_a_run_recorded_before_the_new_settings_is_reused_for_their_old_behaviour(synth_dir, synth, tmp_path, caplog):
    """A record without gate / user_knowledge / levels_auto (written before they existed) holds the old behaviour:
    reused when the flags ask for that behaviour, recomputed (saying why) under today's defaults."""
    _, _, kn, _ = synth
    out = tmp_path / "old"
    old_flags = ("--gate", "none", "--user-knowledge", "full-history")
    assert _compare(synth_dir, kn, out, "--variants", "plain", "--epochs", "1", *old_flags) == 0
    _written_before(
        out, ("star__plain__s0.json",), "gate", "knowledge_dropout", "user_knowledge", "early_rows", "levels_auto"
    )
    log = _compare_log(caplog, synth_dir, kn, out, "--variants", "plain", "--epochs", "1", *old_flags)
    assert "reuse star__plain__s0.json (same settings)" in log
    log = _compare_log(caplog, synth_dir, kn, out, "--variants", "plain", "--epochs", "1")
    assert "recompute star__plain__s0.json: settings changed: gate 'none' -> 'scalar'; " in log
    assert "user_knowledge 'full-history' -> 'leak-free'" in log


def test_a_setting_only_auto_reads_leaves_the_other_runs_reusable(synth_dir, synth, tmp_path, caplog):
    """--auto-item-init-std is newer than these records: the plain run (which never reads it) is reused, the auto run
    (which then had no second-init candidate) is recomputed, saying why."""
    _, _, kn, _ = synth
    out = tmp_path / "runs"
    assert _compare(synth_dir, kn, out, "--variants", "plain,auto", "--epochs", "1") == 0
    _written_before(out, ("star__plain__s0.json", "star__auto__s0.json"), "auto_item_init_std")
    log = _compare_log(caplog, synth_dir, kn, out, "--variants", "plain,auto", "--epochs", "1")
    assert "reuse star__plain__s0.json (same settings)" in log
    assert "recompute star__auto__s0.json: settings changed: auto_item_init_std 0.0 -> 0.05" in log
    record = json.loads((out / "runs" / "star__auto__s0.json").read_text())
    assert [c["levels"] for c in record["level_selection"]["candidates"]][-1] == "scenario,user,item@init=0.05"


def test_the_knowledge_learning_rate_recomputes_only_the_runs_with_knowledge(synth_dir, synth, tmp_path, caplog):
    """--knowledge-lr-scale scales the wrapper's learning rate: a plain run has no wrapper and is reused under another
    scale, an LLM4MSR run is recomputed, saying why; a record from before the field reads as scale 1. The report's
    settings line names the scale the knowledge runs used, not the reused plain run's."""
    _, _, kn, _ = synth
    out = tmp_path / "runs"
    variants = ("--variants", "plain,auto", "--epochs", "1")
    assert _compare(synth_dir, kn, out, *variants, "--knowledge-lr-scale", "1") == 0
    _written_before(out, ("star__plain__s0.json", "star__auto__s0.json"), "knowledge_lr_scale")
    log = _compare_log(caplog, synth_dir, kn, out, *variants, "--knowledge-lr-scale", "1")
    assert "reuse star__plain__s0.json (same settings)" in log
    assert "reuse star__auto__s0.json (same settings)" in log
    log = _compare_log(caplog, synth_dir, kn, out, *variants, "--knowledge-lr-scale", "2")
    assert "reuse star__plain__s0.json (same settings)" in log
    assert "recompute star__auto__s0.json: settings changed: knowledge_lr_scale 1.0 -> 2.0" in log
    record = json.loads((out / "runs" / "star__auto__s0.json").read_text())
    assert record["config"]["knowledge_lr_scale"] == 2.0
    assert "knowledge_lr_scale 2.0." in (out / "report.md").read_text()


def test_the_norm_statistics_setting_recomputes_only_the_backbones_that_have_them(synth_dir, synth, tmp_path, caplog):
    """--norm-stats-batches recounts STAR's normalization statistics; PLE has none, so its runs are reused under
    another value. A STAR record from before the field reads as 0 (the running averages)."""
    _, _, kn, _ = synth
    out = tmp_path / "runs"
    args = ("--variants", "plain", "--epochs", "1", "--backbones", "star,ple")
    assert _compare(synth_dir, kn, out, *args, "--norm-stats-batches", "0") == 0
    _written_before(out, ("star__plain__s0.json", "ple__plain__s0.json"), "norm_stats_batches")
    log = _compare_log(caplog, synth_dir, kn, out, *args, "--norm-stats-batches", "0")
    assert "reuse star__plain__s0.json (same settings)" in log
    log = _compare_log(caplog, synth_dir, kn, out, *args, "--norm-stats-batches", "2")
    assert "reuse ple__plain__s0.json (same settings)" in log
    assert "recompute star__plain__s0.json: settings changed: norm_stats_batches 0 -> 2" in log
