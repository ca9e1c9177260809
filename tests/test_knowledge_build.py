"""The knowledge build with real transformers models: snapshot contents, resume after kill -9, incremental refresh,
PCA spaces, the Ray engine, failing fast on bad data, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fixtures_llm import counting_executor, kill_build_after_shards, knowledge_config, tiny_model  # noqa: F401  (tiny_model: a fixture)

from offline.knowledge.build import run_build
from shared.errors import DatasetError, UserFacingError
from shared.knowledge.snapshot import LATEST, MANIFEST, USER_FIT, KnowledgeSnapshot, stored_name
from tests.required import require

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth200(tmp_path_factory) -> Path:
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    out = tmp_path_factory.mktemp("synth200") / "data"
    write_dataset(generate(SynthConfig(users=200, items_per_scenario=40, main_impressions=12, side_impressions=4)), out)
    return out


def test_build_writes_complete_snapshot(synth_dir, tiny_model, tmp_path):  # noqa: F811
    result = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, mode="generate", pooling="last"))
    snap = KnowledgeSnapshot(tmp_path / "kn")
    assert snap.path == result.path and (tmp_path / "kn" / LATEST).read_text().strip() == snap.version
    users, items, scen = snap.users(), snap.items(), snap.scenarios()
    inter = pd.read_csv(synth_dir / "interactions.csv", dtype=str)
    assert sorted(users.ids) == sorted(inter.user_id.unique())
    assert len(items.ids) == len(pd.read_csv(synth_dir / "items.csv")) and len(scen.ids) == 3
    assert users.dim == items.dim == scen.dim == 32 and users.embeddings.dtype == np.float32
    # generate mode keeps answers (a random model may answer with end-of-text at once: empty)
    assert sum(bool(r) for r in users.responses) > len(users.ids) // 2, users.responses[:5]
    assert not any(items.responses)  # items are embedded in encode mode
    assert np.allclose(snap.default_user(), users.embeddings.mean(0), atol=1e-6)
    m = snap.manifest
    assert m.space.mode == "generate" and m.space.pooling == "last" and m.space.model == "model"
    assert m.computed["user"] == len(users.ids) and m.reused["user"] == 0
    assert not (result.path / "_work").exists()
    # Tokens/s per phase beside texts/s (prompt + answer tokens when generating): the bench's efficiency ratio.
    rates = m.extra["rates"]
    for phase in ("user_generate", "user_embed", "scenario_generate", "item_embed"):
        assert rates[f"{phase}_tokens_per_s"] > rates[f"{phase}_per_s"] > 0, (phase, rates)
    assert 0 < rates["user_generate_new_tokens_per_s"] < rates["user_generate_tokens_per_s"]
    # Different users get different vectors (the prompts differ).
    assert np.unique(users.embeddings.round(5), axis=0).shape[0] == len(users.ids)


def test_malformed_dataset_fails_before_any_llm_call(synth_dir, tiny_model, tmp_path):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(synth_dir, bad)
    inter = (bad / "interactions.csv").read_text().splitlines()
    cols = inter[1].split(",")
    cols[2] = "no_such_scenario"
    inter[1] = ",".join(cols)
    (bad / "interactions.csv").write_text("\n".join(inter) + "\n")

    def factory():
        raise AssertionError("an LLM executor was created for a malformed dataset")

    with pytest.raises(DatasetError) as err:
        run_build(knowledge_config(bad, tmp_path / "kn", tiny_model), executor_factory=factory)
    assert "interactions.csv" in str(err.value) and "no_such_scenario" in str(err.value)
    assert not (tmp_path / "kn").exists() or not any((tmp_path / "kn").iterdir())

    proc = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "build", "--data", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "interactions.csv" in proc.stderr and "line 2" in proc.stderr


def test_incremental_recomputes_only_changed_users(synth200, tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "kn"
    first = run_build(knowledge_config(synth200, out, tiny_model))
    parent = KnowledgeSnapshot(first.path)

    data2 = tmp_path / "data2"
    shutil.copytree(synth200, data2)
    inter = pd.read_csv(data2 / "interactions.csv", dtype=str, keep_default_na=False)
    changed = sorted(inter.user_id.unique())[:2]  # 1% of 200 users
    # each loses its oldest click (a train positive, so its prompt changes)
    drop = [inter.index[(inter.user_id == u) & (inter.label == "1")][0] for u in changed]
    inter.drop(index=drop).to_csv(data2 / "interactions.csv", index=False)

    counts: dict = {}
    cfg = knowledge_config(data2, out, tiny_model)
    second = run_build(cfg, executor_factory=lambda: counting_executor(cfg.backend, counts))
    m = second.manifest
    assert m.parent_version == parent.version
    assert m.computed == {"scenario": 0, "user": 2, "item": 0}
    assert m.reused["user"] == 198
    assert (m.fit_counts.computed, m.fit_counts.reused) == (2, 198)  # the oldest click is in the early history
    assert counts == {"embed": 4}  # the LLM saw exactly the two changed users (serve and fit prompts)
    child = KnowledgeSnapshot(second.path)
    for u in sorted(set(parent.users().ids) - set(changed))[:50]:
        assert np.array_equal(child.users().lookup([u])[0], parent.users().lookup([u])[0])
    # The recomputed vectors are what a full build gives.
    full = run_build(knowledge_config(data2, tmp_path / "full", tiny_model))
    fresh = KnowledgeSnapshot(full.path).users().lookup(changed)[0]
    assert np.allclose(child.users().lookup(changed)[0], fresh, atol=1e-5)
    assert not np.allclose(child.users().lookup(changed)[0], parent.users().lookup(changed)[0], atol=1e-3)


def test_kill_9_then_resume_equals_uninterrupted(synth200, tiny_model, tmp_path):  # noqa: F811
    from llm4msr_cli import build_parser
    from offline.knowledge.cli import config_from_args

    out = tmp_path / "killed"
    argv = [
        "knowledge",
        "build",
        "--data",
        str(synth200),
        "--model",
        str(tiny_model),
        "--dtype",
        "float32",
        "--mode",
        "generate",
        "--max-new-tokens",
        "24",
        "--shard-size",
        "4",
        "--no-progress",
        "--fit-share",  # the old protocol: the fit table's resume is tests/test_knowledge_fit.py's (half the time)
        "0",
    ]
    finished_before = kill_build_after_shards(argv, out, "users-gen-*.parquet")
    assert finished_before

    recomputed = []
    args = build_parser().parse_args([*argv, "--out", str(out)])
    resumed = run_build(
        config_from_args(args), on_shard=lambda t, ph, k: recomputed.append(f"{stored_name(t)}-{ph}-{k:05d}.parquet")
    )
    assert recomputed and not finished_before & set(recomputed), "finished shards were recomputed"
    assert len(list(out.iterdir())) == 2  # one version + LATEST

    args = build_parser().parse_args([*argv, "--out", str(tmp_path / "clean")])
    clean = run_build(config_from_args(args))
    a, b = KnowledgeSnapshot(resumed.path), KnowledgeSnapshot(clean.path)
    # Truncations are counted over every text of the build, also those whose shards finished before the kill.
    assert a.manifest.truncated == b.manifest.truncated and set(a.manifest.truncated) == {
        f"{level}_{op}" for level in ("scenario", "user") for op in ("generate", "embed")
    } | {"item_embed"}
    for level in ("scenario", "user", "item"):
        ta, tb = a.table(level), b.table(level)
        assert ta.ids == tb.ids and len(set(ta.ids)) == len(ta.ids)
        assert ta.responses == tb.responses
        assert np.array_equal(ta.embeddings, tb.embeddings)


def test_pca_space_is_reused_by_refresh(synth_dir, tiny_model, tmp_path):  # noqa: F811
    first = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, reduce_dim=8))
    snap = KnowledgeSnapshot(first.path)
    assert snap.users().dim == 8 and snap.space.dim == 8 and snap.space.raw_dim == 32
    assert snap.space.reducer_sha256 and (first.path / "reducer.safetensors").exists()
    second = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, reduce_dim=8))
    assert second.manifest.space.id == snap.space.id and second.manifest.computed["user"] == 0
    third = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, reduce_dim=8, new_space=True))
    assert third.manifest.computed["user"] == len(snap.users().ids) and third.manifest.parent_version is None


def _over(tokenizer, texts: list[str], limit: int, chat: bool) -> int:
    """How many texts exceed limit tokens, counted here independently of the backends' helpers."""
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    return sum(len(ids) > limit for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"])


def test_truncation_is_counted_warned_once_and_max_length_defines_the_space(
    synth_dir,
    tiny_model,  # noqa: F811
    tmp_path,
    caplog,
):
    from transformers import AutoTokenizer

    from offline.knowledge.backends.base import choose_dtype, cpu_capability
    from offline.knowledge.show import PROMPTS_FILE

    limit = 96
    cfg = knowledge_config(synth_dir, tmp_path / "kn", tiny_model, mode="generate")
    cut_cfg = replace(cfg, backend=replace(cfg.backend, dtype="auto", max_length=limit))
    with caplog.at_level("WARNING", logger="offline.knowledge.build"):
        cut = run_build(cut_cfg)
    m = cut.manifest
    # What ran is recorded: backend, the dtype auto chose on this CPU and why, the CPU's bf16 capability.
    expected = choose_dtype("auto", "cpu", cpu_capability())
    assert (m.backend, m.dtype) == ("hf", expected.dtype)
    assert m.hardware == expected.to_dict() and m.hardware["requested"] == "auto"
    assert set(m.hardware["cpu"]) == {"model", "native_bf16", "bf16_flags"}

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    snap = KnowledgeSnapshot(cut.path)
    prompts = pq.read_table(cut.path / PROMPTS_FILE).to_pandas()
    want = {}
    for level in ("scenario", "user", USER_FIT, "item"):
        table = snap.table(level)
        texts = prompts[prompts.level == stored_name(level)].set_index("id").loc[table.ids, "prompt"].tolist()
        if level == "item":
            want["item_embed"] = _over(tok, texts, limit, chat=False)
            continue
        want[f"{level}_generate"] = _over(tok, texts, limit, chat=True)
        answered = [t + " " + r for t, r in zip(texts, table.responses, strict=True)]
        want[f"{level}_embed"] = _over(tok, answered, limit, chat=False)
    assert m.truncated == want
    total = sum(want.values())
    assert want["user_embed"] > 0 and want["item_embed"] == 0, want
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "cut to it" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert f"{total} text(s) were longer than max_length {limit}" in warnings[0].getMessage()
    assert f"{total} texts cut to {limit} tokens" in cut.summary()
    on_disk = json.loads((cut.path / MANIFEST).read_text())
    assert on_disk["truncated"] == want and on_disk["space"]["max_length"] == limit

    # The default max_length cuts nothing, warns nothing, and is another knowledge space: the cut build's vectors
    # are not reused. It runs in the dtype auto chose above (bfloat16 on a CPU with native bf16, else float32), set
    # explicitly, so that the vectors of the texts neither build cuts are computed alike.
    caplog.clear()
    with caplog.at_level("WARNING", logger="offline.knowledge.build"):
        full = run_build(replace(cfg, out=str(tmp_path / "kn"), backend=replace(cfg.backend, dtype=m.dtype)))
    assert not [r for r in caplog.records if "cut to it" in r.getMessage()]
    assert sum(full.manifest.truncated.values()) == 0 and full.manifest.parent_version is None
    assert full.manifest.space.id != m.space.id and full.manifest.computed["user"] == len(snap.users().ids)
    assert full.manifest.dtype == m.dtype and full.manifest.hardware["reason"] == "set explicitly (--dtype)"
    # Cut texts really got other vectors; uncut ones (items) did not.
    fsnap = KnowledgeSnapshot(full.path)
    assert np.allclose(fsnap.items().embeddings, snap.items().embeddings, atol=1e-5)
    assert not np.allclose(fsnap.users().embeddings, snap.users().embeddings, atol=1e-3)


def test_manifest_from_before_the_new_fields_loads_and_refreshes(synth_dir, tiny_model, tmp_path):  # noqa: F811
    """Snapshots written before max_length, dtype, hardware, truncated and the fit vectors were recorded keep their
    space id and stay the parent of the next incremental build, which computes the fit vectors they lack."""
    first = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, fit_share=0))
    file = first.path / MANIFEST
    data = json.loads(file.read_text())
    for key in ("dtype", "hardware", "truncated", "fit_share", "fit_counts"):
        del data[key]
    del data["space"]["max_length"]
    file.write_text(json.dumps(data))
    old = KnowledgeSnapshot(first.path)
    assert old.space.id == data["space"]["id"] == first.manifest.space.id and old.space.max_length == 2048
    assert (old.manifest.dtype, old.manifest.hardware, old.manifest.truncated) == ("", {}, {})
    assert old.manifest.fit_share is None and not old.has_fit_vectors
    again = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model))
    assert again.manifest.parent_version == old.version and again.manifest.computed["user"] == 0
    assert again.manifest.fit_counts.computed == len(old.users().ids) and again.manifest.fit_counts.reused == 0
    assert again.manifest.space.id == old.space.id


def test_ray_engine_matches_local(synth_dir, tiny_model, tmp_path):  # noqa: F811
    require(importlib.util.find_spec("ray"), "ray is not installed (the [ray] or [dev] extra)")
    import ray

    from offline.knowledge.ray_engine import RayConfig

    local = run_build(knowledge_config(synth_dir, tmp_path / "local", tiny_model, shard_size=16))
    try:
        distributed = run_build(
            knowledge_config(
                synth_dir,
                tmp_path / "ray",
                tiny_model,
                shard_size=16,
                engine="ray",
                engine_options=RayConfig(workers=2),
            )
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    a, b = KnowledgeSnapshot(local.path), KnowledgeSnapshot(distributed.path)
    assert b.manifest.extra["engine"] == "ray"
    for level in ("user", USER_FIT, "item", "scenario"):
        assert a.table(level).ids == b.table(level).ids
        assert np.allclose(a.table(level).embeddings, b.table(level).embeddings, atol=1e-5)


def test_cli_build_and_show_with_smollm2(tmp_path):
    """The embedded default model end to end (a few users, so that it stays quick)."""
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    data = tmp_path / "data"
    write_dataset(generate(SynthConfig(users=8, items_per_scenario=6, main_impressions=6, side_impressions=2)), data)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm4msr_cli",
            "knowledge",
            "build",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "kn"),
            "--threads",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "users 8 (8 computed, 0 reused)" in run.stdout
    snap = KnowledgeSnapshot(tmp_path / "kn")
    assert snap.users().dim == 576 and snap.space.model == "SmolLM2-135M-Instruct.Q4_1"
    user = snap.users().ids[0]
    show = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "show", str(tmp_path / "kn"), "--user", user],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert "--- prompt ---" in show.stdout and "interests in each scenario" in show.stdout
    norm = float(np.linalg.norm(snap.users().lookup([user])[0][0]))
    assert f"norm {norm:.4f}" in show.stdout
    fit = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "show", str(tmp_path / "kn"), "--user", user, "--fit"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert fit.returncode == 0, fit.stderr
    fit_norm = float(np.linalg.norm(snap.fit_users().lookup([user])[0][0]))
    assert f"norm {fit_norm:.4f}" in fit.stdout and "fit share 0.7" in fit.stdout and fit_norm != norm
    manifest = json.loads((snap.path / MANIFEST).read_text())
    assert (
        manifest["space"]["template_sha256"]
        == __import__("offline.knowledge.prompts").knowledge.prompts.template_sha256()
    )


def test_reduced_build_reuses_an_unreduced_parents_llm_vectors(synth_dir, tiny_model, tmp_path):  # noqa: F811
    """Moving a root to a reduced space costs no LLM work: the parent's own vectors go through the new reducer, and
    the result equals a full reduced build."""
    from offline.knowledge.build_reduce import apply_reducer

    raw = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, reduce_dim=None))
    assert raw.manifest.space.reducer_sha256 is None and raw.manifest.space.dim == 32
    reduced = run_build(knowledge_config(synth_dir, tmp_path / "kn", tiny_model, reduce_dim=8))
    m = reduced.manifest
    assert m.parent_version == raw.manifest.version and m.space.dim == 8 and m.space.reducer_sha256
    assert all(m.computed[level] == 0 for level in ("scenario", "user", "item"))
    mean, comps = KnowledgeSnapshot(reduced.path).reducer()
    before, after = KnowledgeSnapshot(raw.path), KnowledgeSnapshot(reduced.path)
    for table in ("scenario", "user", "item", USER_FIT):
        assert after.table(table).ids == before.table(table).ids
        expected = apply_reducer(before.table(table).embeddings, mean, comps)
        np.testing.assert_allclose(after.table(table).embeddings, expected, rtol=1e-5, atol=1e-5)
    full = run_build(knowledge_config(synth_dir, tmp_path / "full", tiny_model, reduce_dim=8))
    assert full.manifest.computed["user"] > 0
    for table in ("scenario", "user", "item", USER_FIT):
        np.testing.assert_allclose(
            KnowledgeSnapshot(full.path).table(table).embeddings, after.table(table).embeddings, atol=1e-4
        )


def test_reduce_dim_auto_keeps_the_latest_space_and_reduces_only_wide_well_sampled_llms():
    from types import SimpleNamespace

    from offline.knowledge.build_config import AUTO_REDUCE_DIM
    from offline.knowledge.build_plan import resolve_reduce_dim

    def latest(dim, reducer):
        return SimpleNamespace(version="v1", space=SimpleNamespace(dim=dim, reducer_sha256=reducer))

    assert resolve_reduce_dim(16, 576, latest(576, None), 10)[0] == 16  # a number is taken as given
    assert resolve_reduce_dim(None, 576, None, 100_000)[0] is None
    assert resolve_reduce_dim("auto", 576, None, 100_000)[0] == AUTO_REDUCE_DIM
    assert resolve_reduce_dim("auto", 4096, None, 1024)[0] == AUTO_REDUCE_DIM
    assert resolve_reduce_dim("auto", 4096, None, 1023)[0] is None  # too few vectors for the PCA
    assert resolve_reduce_dim("auto", 256, None, 100_000)[0] is None  # not wider than the target
    # A refresh never changes the space by itself: the latest version decides, reduced or not.
    assert resolve_reduce_dim("auto", 576, latest(576, None), 100_000)[0] is None
    assert resolve_reduce_dim("auto", 576, latest(128, "abc"), 10)[0] == 128


def test_reduce_dim_option_takes_a_number_none_or_auto(tmp_path):
    import argparse

    from offline.knowledge.build_config import KnowledgeConfig
    from offline.knowledge.cli import add_build_args, config_from_args

    parser = argparse.ArgumentParser()
    add_build_args(parser)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "kn")]
    assert config_from_args(parser.parse_args(base)).reduce_dim == "auto"
    assert config_from_args(parser.parse_args([*base, "--reduce-dim", "none"])).reduce_dim is None
    assert config_from_args(parser.parse_args([*base, "--reduce-dim", "64"])).reduce_dim == 64
    for bad in ("0", "-3", "half"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--reduce-dim", bad])
    with pytest.raises(UserFacingError, match="--reduce-dim"):
        KnowledgeConfig(data="d", out="o", reduce_dim=0)
