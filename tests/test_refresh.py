"""`llm4msr refresh`: outcomes and exit codes of the nightly job, and the job end to end with a real ranker.

The outcome tests replace only the LLM build (a real snapshot with seeded vectors is written instead) and, where a
failure is the point, one step; training, Redis publishing and the report are real. The end-to-end test runs the
real command with the embedded SmolLM2 on a small synthetic dataset, a real Redis and a real uvicorn ranker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from offline.refresh.job import ExitCode, RefreshConfig, RefreshReport, run_refresh
from shared.errors import UserFacingError
from shared.knowledge import keys
from shared.redact import redact_url
from tests.fixtures_deploy import DEPLOY, K8S, REPO, Proc, llm4msr_cmd, llm4msr_env
from tests.fixtures_models import add_fit_table
from tests.fixtures_serving import make_space, seeded_table, start_server, write_snapshot


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    out = tmp_path_factory.mktemp("refresh") / "data"
    cfg = SynthConfig(users=30, scenarios=2, items_per_scenario=15, main_impressions=10, side_impressions=3)
    write_dataset(generate(cfg), out)
    return out


def knowledge_config(data_dir: Path, root: Path):
    from offline.knowledge.build import KnowledgeConfig

    return KnowledgeConfig(data=str(data_dir), out=str(root), progress=False)


def train_config():
    from offline.training.trainer import TrainConfig

    return TrainConfig(epochs=1, batch_size=256, threads=1, progress=False)


def fake_build(version: str, space):
    """Stands in for the LLM: writes a real snapshot (seeded vectors, fit user vectors too) on the config's real
    split."""

    def build(kcfg):
        from offline.data.split import make_split
        from offline.knowledge.build import BuildResult
        from shared.dataset.folder import read_dataset
        from shared.knowledge.snapshot import KnowledgeSnapshot

        dataset = read_dataset(kcfg.data)
        split = make_split(dataset, kcfg.split)
        users = sorted(split.train_positives()["user_id"].astype(str).unique())
        items = dataset.items["item_id"].astype(str).tolist()
        vdir = write_snapshot(
            Path(kcfg.out), version, dataset.scenario_names, users, items, space, split_fingerprint=split.fingerprint()
        )
        fit = seeded_table(users, space.dim, seed=7, answer=None)
        add_fit_table(vdir, dict(zip(fit.ids, fit.embeddings)), kcfg.fit_share)
        return BuildResult(vdir, KnowledgeSnapshot(vdir).manifest, 0.01)

    return build


def make_config(data_dir: Path, tmp: Path, redis_url: str | None, **kw) -> RefreshConfig:
    return RefreshConfig(
        knowledge=knowledge_config(data_dir, tmp / "knowledge"),
        artifact_dir=str(tmp / "models" / "current"),
        redis_url=redis_url,
        train=train_config(),
        **kw,
    )


def current_version(redis_server) -> str | None:
    raw = redis_server.client().get(keys.CURRENT)
    return raw.decode() if raw else None


def test_first_run_same_space_and_new_space(data_dir, tmp_path, redis_server):
    from shared.artifact import read_artifact_config

    space_a, space_b = make_space(8, model="model-a"), make_space(8, model="model-b")
    cfg = make_config(data_dir, tmp_path, redis_server.url)

    # 1. no model yet: train one, publish, and say that the rankers must load it
    r1 = run_refresh(cfg, build=fake_build("v1", space_a))
    assert r1.exit_code == ExitCode.ROLLOUT, r1.to_dict()
    assert r1.retrained and r1.retrain_reason == "no artifact yet" and r1.rollout_required
    art = read_artifact_config(cfg.artifact_dir)
    assert art.knowledge_space_id == space_a.id and r1.model_version == art.model_version
    assert current_version(redis_server) == "v1" and r1.published
    assert [r1.steps[s].status for s in ("build", "train", "publish", "reload")] == ["ok", "ok", "ok", "skipped"]

    # 2. same space: no retraining, the new version is published, the rankers follow it by themselves
    weights = Path(cfg.artifact_dir) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    r2 = run_refresh(cfg, build=fake_build("v2", space_a))
    assert r2.exit_code == ExitCode.OK, r2.to_dict()
    assert not r2.retrained and r2.steps["train"].status == "skipped" and not r2.rollout_required
    assert weights.stat().st_mtime_ns == mtime
    assert r2.model_version == art.model_version and r2.previous_knowledge_version == "v1"
    assert current_version(redis_server) == "v2"

    # 3. the knowledge space changed: retrain on it before publishing
    r3 = run_refresh(cfg, build=fake_build("v3", space_b))
    assert r3.exit_code == ExitCode.ROLLOUT
    assert r3.retrain_reason == f"knowledge space changed ({space_a.id} -> {space_b.id})"
    assert read_artifact_config(cfg.artifact_dir).knowledge_space_id == space_b.id
    assert current_version(redis_server) == "v3"
    # keep_old=1: v2 stays for rollback, v1 is gone
    client = redis_server.client()
    assert client.exists(keys.meta_key("v2")) and not client.exists(keys.meta_key("v1"))


def test_failures_map_to_exit_codes(data_dir, tmp_path, redis_server):
    space = make_space(8)
    cfg = make_config(data_dir, tmp_path, redis_server.url)

    def raises(exc):
        def fn(*_a, **_k):
            raise exc

        return fn

    bad = run_refresh(cfg, build=raises(UserFacingError("interactions.csv row 3: bad label")))
    assert bad.exit_code == ExitCode.USAGE and bad.steps["build"].status == "failed"
    assert "row 3" in bad.message and bad.steps["train"].status == "pending"
    crash = run_refresh(cfg, build=raises(RuntimeError("CUDA out of memory")))
    assert crash.exit_code == ExitCode.FAILED and "out of memory" in crash.steps["build"].error

    # retraining fails: the new knowledge is kept on disk but not published
    r = run_refresh(cfg, build=fake_build("v1", space), train_fn=raises(RuntimeError("nan loss")))
    assert r.exit_code == ExitCode.PARTIAL and not r.published and current_version(redis_server) is None
    assert (tmp_path / "knowledge" / "v1" / "manifest.json").exists()

    # a model exists; Redis refuses the publish: partial, the rankers keep the current version
    assert run_refresh(cfg, build=fake_build("v2", space)).exit_code == ExitCode.ROLLOUT
    redis_server.stop()
    r = run_refresh(cfg, build=fake_build("v3", space))
    redis_server.start()
    assert r.exit_code == ExitCode.PARTIAL and r.steps["publish"].status == "failed", r.to_dict()
    assert "llm4msr knowledge publish" in r.message

    # no model and --retrain never: nothing a ranker could serve
    never = make_config(data_dir, tmp_path / "other", redis_server.url, retrain="never")
    r = run_refresh(never, build=fake_build("v1", space))
    assert r.exit_code == ExitCode.PARTIAL and not r.published

    # a second refresh on the same knowledge root while one runs
    import fcntl

    with open(tmp_path / "knowledge" / ".refresh.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_refresh(cfg, build=fake_build("v4", space))
    assert busy.exit_code == ExitCode.BUSY and busy.steps["build"].status == "pending"


def test_reload_after_retrain(data_dir, tmp_path):
    space = make_space(8)
    calls = []

    def reload_ok(url, token):
        calls.append((url, token))
        return {"model_version": "x"}

    cfg = make_config(data_dir, tmp_path, None, reload_urls=("http://a:8000", "http://b:8000"), admin_token="t")
    r = run_refresh(cfg, build=fake_build("v1", space), reload_fn=reload_ok)
    assert r.exit_code == ExitCode.OK and calls == [("http://a:8000", "t"), ("http://b:8000", "t")]
    assert r.steps["publish"].status == "skipped"  # no Redis: rankers follow the root's LATEST
    assert not r.rollout_required

    def reload_b_down(url, token):
        if "b" in url:
            raise httpx.ConnectError("refused")
        return {}

    r = run_refresh(cfg, build=fake_build("v2", make_space(8, "m2")), reload_fn=reload_b_down)
    assert r.exit_code == ExitCode.ROLLOUT and r.rollout_required
    assert list(r.steps["reload"].detail["failed"]) == ["http://b:8000"]
    with pytest.raises(UserFacingError, match="admin token"):
        make_config(data_dir, tmp_path, None, reload_urls=("http://a:8000",))


def test_report_file_and_redaction(tmp_path):
    report = RefreshReport(started_at="t", redis_url=redact_url("rediss://u:pw@h:1/0"))
    report.write(tmp_path / "reports" / "r.json")
    data = json.loads((tmp_path / "reports" / "r.json").read_text())
    assert data["redis_url"] == "rediss://u:***@h:1/0" and set(data["steps"]) == {"build", "train", "publish", "reload"}


def test_step_errors_and_messages_never_carry_a_password(data_dir, tmp_path, caplog):
    """Exceptions may quote the URL (or just the password): the report and the logged traceback mask it."""
    secret_url = "redis://:s3cret@127.0.0.1:6390/0"
    cfg = make_config(
        data_dir,
        tmp_path,
        secret_url,
        reload_urls=("http://admin:r3load-pw@ranker:8000",),
        admin_token="t",
    )

    def publish_quoting(_path, url, _keep):
        raise RuntimeError(f"cannot reach {url} (auth s3cret)")

    def reload_quoting(url, _token):
        raise RuntimeError(f"{url} refused")

    with caplog.at_level("ERROR"):
        r = run_refresh(cfg, build=fake_build("v1", make_space(8)), publish=publish_quoting)
    assert r.exit_code == ExitCode.PARTIAL and r.steps["publish"].status == "failed"
    text = json.dumps(r.to_dict()) + r.summary() + caplog.text
    assert "s3cret" not in text and "cannot reach redis://:***@127.0.0.1" in r.steps["publish"].error
    assert "refresh step failed" in caplog.text  # the traceback was logged, masked

    def publish_ok(_path, _url, _keep):
        return "v1"

    r = run_refresh(cfg, build=fake_build("v2", make_space(8, "m2")), publish=publish_ok, reload_fn=reload_quoting)
    assert r.exit_code == ExitCode.ROLLOUT
    assert r.steps["reload"].detail["failed"] == {
        "http://admin:***@ranker:8000": "http://admin:***@ranker:8000 refused"
    }
    assert "r3load-pw" not in json.dumps(r.to_dict())


def test_exit_codes_are_documented_where_schedulers_read_them():
    readme = (DEPLOY / "README.md").read_text()
    cron_text = (K8S / "refresh-cronjob.yaml").read_text()
    for code in ExitCode:
        assert re.search(rf"\|\s*{code.value}\s*\|\s*`?{code.name.lower()}", readme), f"README lacks exit {code}"
    cron = yaml.safe_load(cron_text)
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    fail_job = {v for r in rules if r["action"] == "FailJob" for v in r["onExitCodes"]["values"]}
    assert {ExitCode.USAGE, ExitCode.ROLLOUT} <= fail_job


# ------------------------------------------------------------------------------------- end to end (real LLM)


def _rank_knowledge_version(base: str, user: str, scenario: str, items: list[str]) -> str:
    r = httpx.post(
        base + "/rank",
        json={"user_id": user, "scenario": scenario, "candidates": [{"item_id": i} for i in items]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()["knowledge_version"]


def _refresh(data: Path, tmp: Path, redis_url: str, report: Path) -> tuple[int, dict, str]:
    args = [
        "refresh", "--data", str(data), "--knowledge-root", str(tmp / "knowledge"),
        "--artifact-dir", str(tmp / "models" / "current"), "--redis-url", redis_url, "--report", str(report),
        "--train-epochs", "1", "--train-threads", "1", "--threads", "2", "--no-progress",
        "--max-items-per-scenario", "4", "--history-token-budget", "64", "--min-interactions", "3",
    ]  # fmt: skip
    log = tmp / f"{report.stem}.log"
    proc = Proc(llm4msr_cmd(*args), log, env=llm4msr_env(), cwd=REPO)
    rc = proc.proc.wait(timeout=600)
    proc.stop()
    text = log.read_text(errors="replace")
    return rc, json.loads(report.read_text()) if report.exists() else {}, text


@pytest.mark.slow
def test_refresh_end_to_end_ranker_follows_new_version(tmp_path, redis_server):
    """Embedded SmolLM2, real Redis, real ranker: the second (incremental) run is served without a restart."""
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    data = tmp_path / "data"
    cfg = SynthConfig(users=12, scenarios=2, items_per_scenario=8, main_impressions=8, side_impressions=3)
    write_dataset(generate(cfg), data)

    rc, rep1, log = _refresh(data, tmp_path, redis_server.url, tmp_path / "report1.json")
    assert rc == ExitCode.ROLLOUT, log[-3000:]
    assert rep1["retrained"] and rep1["published"] and rep1["steps"]["build"]["detail"]["reused"] == 0
    v1 = rep1["knowledge_version"]
    assert current_version(redis_server) == v1

    server = start_server(
        ["--artifact", str(tmp_path / "models" / "current"), "--redis-url", redis_server.url],
        tmp_path / "ranker.log",
        env={"LLM4MSR_POLL_INTERVAL_S": "0.2"},
    )
    try:
        items = pd.read_csv(data / "items.csv", dtype=str)
        scenario = items["scenario"].iloc[0]
        cands = items.loc[items["scenario"] == scenario, "item_id"].tolist()
        inter = pd.read_csv(data / "interactions.csv", dtype=str)
        user = inter["user_id"].iloc[0]
        assert _rank_knowledge_version(server.url, user, scenario, cands) == v1

        # new activity of one user (positives on items it never touched): only changed prompts are recomputed
        seen_items = set(inter.loc[inter["user_id"] == user, "item_id"])
        fresh = items[~items["item_id"].isin(seen_items)].head(8)
        t_max = inter["timestamp"].astype(int).max()
        extra = pd.DataFrame(
            {
                "user_id": user,
                "item_id": fresh["item_id"].tolist(),
                "scenario": fresh["scenario"].tolist(),
                "label": "1",
                "timestamp": [str(t_max + 3600 * (k + 1)) for k in range(len(fresh))],
            }
        )
        pd.concat([inter, extra[inter.columns]]).to_csv(data / "interactions.csv", index=False)

        rc, rep2, log = _refresh(data, tmp_path, redis_server.url, tmp_path / "report2.json")
        assert rc == ExitCode.OK, log[-3000:]
        assert not rep2["retrained"] and rep2["published"] and rep2["previous_knowledge_version"] == v1
        build = rep2["steps"]["build"]["detail"]
        assert build["reused"] > 0 and build["computed_by_level"].get("user", 0) >= 1, build
        assert build["computed_by_level"].get("user", 0) < build["counts"]["user"], build
        v2 = rep2["knowledge_version"]
        assert v2 != v1 and current_version(redis_server) == v2

        deadline = time.time() + 15
        seen = v1
        while time.time() < deadline and seen != v2:
            seen = _rank_knowledge_version(server.url, user, scenario, cands)
            time.sleep(0.2)
        assert seen == v2, server.log()[-3000:]
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        assert f'knowledge_version="{v2}"' in metrics
        assert os.path.exists(tmp_path / "report2.json")
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- levels auto, old artifacts


def test_refresh_defaults_to_levels_auto_and_retrains_with_it(data_dir, tmp_path):
    """`llm4msr refresh` trains a first model with --levels auto (and leak-free users); a retrain of that model
    chooses again, while an explicit --levels keeps fixed levels."""
    import llm4msr_cli
    from offline.refresh.cli import config_from_args
    from shared.artifact import read_artifact_config

    base = ["refresh", "--data", str(data_dir), "--knowledge-root", str(tmp_path / "kn"), "--artifact-dir", "a"]
    parser = llm4msr_cli.build_parser()
    auto = config_from_args(parser.parse_args(base)).train
    assert auto.levels_auto and auto.user_knowledge == "leak-free"
    fixed = config_from_args(parser.parse_args([*base, "--levels", "scenario,user,item"])).train
    assert not fixed.levels_auto and fixed.wrapper.levels == ["scenario", "user", "item"]

    cfg = dataclasses.replace(
        make_config(data_dir, tmp_path, None), train=auto.with_values(epochs=1, batch_size=256, threads=1)
    )
    r1 = run_refresh(cfg, build=fake_build("v1", make_space(8)))
    assert r1.exit_code == ExitCode.ROLLOUT, r1.to_dict()
    selection = r1.steps["train"].detail["level_selection"]
    names = [c["levels"] for c in selection["candidates"]]
    assert names == ["none", "scenario,user", "scenario,user,item", "scenario,user,item@init=0.05"]
    assert selection["chosen"] in names
    art = read_artifact_config(cfg.artifact_dir)
    assert art.train["levels_auto"] is True and art.train["level_selection"] == selection
    chosen_levels = selection["chosen"].partition("@")[0]
    assert art.levels == ([] if chosen_levels == "none" else chosen_levels.split(","))
    r2 = run_refresh(cfg, build=fake_build("v2", make_space(8, "m2")))  # new space: retrain, again with auto
    assert r2.retrained and "level_selection" in r2.steps["train"].detail


def test_retrain_of_an_artifact_from_before_gates_keeps_its_settings():
    """An artifact trained before gates, fit vectors and --levels auto retrains as it was trained: ungated, on the
    full-history protocol, with its fixed levels, even where today's defaults differ."""
    from offline.refresh.job import train_config_from_artifact
    from offline.training.config import TrainConfig
    from shared.artifact import ArtifactConfig

    old_train = {"backbone": "mmoe", "levels": ["scenario", "user", "item"], "epochs": 3, "best_epoch": 2}
    today = TrainConfig(levels_auto=True)
    cfg = train_config_from_artifact(ArtifactConfig.model_construct(train=old_train), today)
    assert (cfg.backbone, cfg.epochs, cfg.wrapper.levels) == ("mmoe", 3, ["scenario", "user", "item"])
    assert (cfg.wrapper.gate, cfg.user_knowledge, cfg.levels_auto) == ("none", "full-history", False)
    new_train = {**today.to_dict(), "backbone": "ple"}
    again = train_config_from_artifact(ArtifactConfig.model_construct(train=new_train), None)
    assert (again.wrapper.gate, again.user_knowledge, again.levels_auto) == ("scalar", "leak-free", True)
