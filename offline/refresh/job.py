"""The nightly refresh as one job: build knowledge incrementally -> retrain if needed -> publish -> (reload rankers).

Why this order: a ranker refuses knowledge from another knowledge space than its model's, so when the space changes
(new LLM, prompt templates, pooling or reducer) the new model must exist before the new knowledge is published;
rankers keep serving the previous version (kept in Redis for rollback) until they load the new model. An
incremental build in the same space needs no retraining: the running rankers swap to the new version by themselves.

Every run writes a report (JSON) and ends with an exit code a scheduler can act on (`ExitCode`). The report, its
step errors and the logged tracebacks mask the password of every URL the job was given (shared/redact.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path

from shared.errors import UserFacingError
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)

LOCK_FILE = ".refresh.lock"
RETRAIN_MODES = ("auto", "always", "never")


class ExitCode(IntEnum):
    """What a scheduler does with each outcome (deploy/README.md repeats this table)."""

    OK = 0  # knowledge built and published; the rankers follow the new version by themselves
    FAILED = 1  # nothing changed for the rankers (build failed, unexpected error): retry later
    USAGE = 2  # bad input or configuration (dataset, flags, artifact): a person must fix it; do not retry
    PARTIAL = 3  # knowledge built but not published, or retraining failed: rankers unchanged; retry
    ROLLOUT = 4  # done, and a new model was trained: restart/reload the rankers to serve it
    BUSY = 5  # another refresh holds the lock on this knowledge root: skipped


@dataclass(frozen=True)
class RefreshConfig:
    knowledge: object  # offline.knowledge.build.KnowledgeConfig (data, out = knowledge root, backend, split ...)
    artifact_dir: str
    redis_url: str | None = None
    keep_old: int = 1
    retrain: str = "auto"
    # TrainConfig used when no artifact exists yet (else the current artifact's own training config is reused).
    train: object | None = None
    # Rankers to reload after a retrain (POST <url>/admin/reload with the admin token).
    reload_urls: tuple[str, ...] = ()
    admin_token: str | None = None

    def __post_init__(self) -> None:
        if self.retrain not in RETRAIN_MODES:
            raise UserFacingError(f"--retrain must be one of {RETRAIN_MODES}")
        if self.keep_old < 0:
            raise UserFacingError("--keep-old must be >= 0")
        if self.reload_urls and not self.admin_token:
            raise UserFacingError("--reload-url needs the rankers' admin token (env LLM4MSR_ADMIN_TOKEN)")


@dataclass
class Step:
    status: str = "pending"  # ok | skipped | failed | pending
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class RefreshReport:
    started_at: str
    finished_at: str = ""
    exit_code: int = int(ExitCode.FAILED)
    outcome: str = ""
    message: str = ""
    knowledge_root: str = ""
    artifact_dir: str = ""
    redis_url: str | None = None
    knowledge_version: str | None = None
    previous_knowledge_version: str | None = None
    knowledge_space_id: str | None = None
    artifact_space_id: str | None = None
    model_version: str | None = None
    previous_model_version: str | None = None
    retrained: bool = False
    retrain_reason: str | None = None
    published: bool = False
    rollout_required: bool = False
    steps: dict[str, Step] = field(
        default_factory=lambda: {name: Step() for name in ("build", "train", "publish", "reload")}
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | os.PathLike) -> None:
        """Written via a temp file: a scheduler reading it never sees half a report."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def summary(self) -> str:
        parts = [f"refresh {self.outcome} (exit {self.exit_code})"]
        if self.knowledge_version:
            parts.append(f"knowledge {self.knowledge_version}")
        b = self.steps["build"].detail
        if b.get("computed") is not None:
            parts.append(f"computed {b['computed']} reused {b['reused']}")
        if self.retrained:
            parts.append(f"retrained model {self.model_version} ({self.retrain_reason})")
        parts.append("published" if self.published else "not published")
        if self.message:
            parts.append(self.message)
        return "; ".join(parts)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Lock:
    """An exclusive flock on <knowledge root>/.refresh.lock: two refreshes never write the same root."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _current_artifact(artifact_dir: Path):
    """The artifact's config, or (None, why) when there is none or it is unusable."""
    from shared.artifact import read_artifact_config

    if not artifact_dir.exists():
        return None, "no artifact yet"
    try:
        return read_artifact_config(artifact_dir), None
    except UserFacingError as exc:
        return None, f"current artifact unusable ({exc})"


def _previous_version(root: Path) -> str | None:
    from shared.knowledge.snapshot import KnowledgeSnapshot

    try:
        return KnowledgeSnapshot(root).version
    except UserFacingError:
        return None


def train_config_from_artifact(cfg, fallback):
    """Retrains with what the current model was trained with (backbone, levels, hyper-parameters)."""
    from dataclasses import fields as dc_fields

    from offline.training.trainer import TrainConfig

    base = fallback if fallback is not None else TrainConfig()
    if cfg is None or not cfg.train:
        return base
    known = {f.name for f in dc_fields(TrainConfig)}
    values = {k: v for k, v in cfg.train.items() if k in known}
    values["progress"] = False
    return TrainConfig(**{**asdict(base), **values})


def _default_train(dataset, split, snapshot, train_cfg, out: Path) -> tuple[str, dict]:
    from offline.training.trainer import train
    from shared.artifact import read_artifact_config, save_artifact

    result = train(dataset, split, snapshot, train_cfg)
    save_artifact(out, result.model, result.encoder, result.artifact_fields(split), overwrite=True)
    cfg = read_artifact_config(out)
    overall = result.metrics.get("test", {}).get("overall", {}) if isinstance(result.metrics, dict) else {}
    return cfg.model_version, {
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 2),
        "test_auc": overall.get("auc"),
        "backbone": cfg.backbone,
    }


def _default_publish(snapshot_dir: Path, redis_url: str, keep_old: int) -> str:
    from offline.knowledge.publish import publish_snapshot

    return publish_snapshot(snapshot_dir, redis_url, keep_old=keep_old)


def _default_reload(url: str, token: str) -> dict:
    import httpx

    r = httpx.post(url.rstrip("/") + "/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


def run_refresh(
    config: RefreshConfig,
    *,
    build: Callable | None = None,
    train_fn: Callable | None = None,
    publish: Callable[[Path, str, int], str] | None = None,
    reload_fn: Callable[[str, str], dict] | None = None,
) -> RefreshReport:
    """Runs the job; never raises for an expected failure: the outcome is in the report's exit code.

    build/train_fn/publish/reload_fn replace the real steps (tests inject failures with them).
    """
    kcfg = config.knowledge
    root = Path(kcfg.out)
    artifact_dir = Path(config.artifact_dir)
    report = RefreshReport(
        started_at=_now(),
        knowledge_root=str(root),
        artifact_dir=str(artifact_dir),
        redis_url=redact_url(config.redis_url),
    )
    lock = _Lock(root)
    if not lock.acquire():
        return _finish(report, ExitCode.BUSY, "busy", f"another refresh holds {lock.path}")
    try:
        report = _run(config, report, root, artifact_dir, build, train_fn, publish, reload_fn)
    finally:
        lock.release()
    return _scrub(report, _secret_urls(config))


def _run(config, report, root, artifact_dir, build, train_fn, publish, reload_fn) -> RefreshReport:
    from offline.knowledge.build import run_build

    kcfg = config.knowledge
    secrets = _secret_urls(config)
    report.previous_knowledge_version = _previous_version(root)
    current, missing_why = _current_artifact(artifact_dir)
    if current is not None:
        report.previous_model_version = current.model_version
        report.artifact_space_id = current.knowledge_space_id
        report.model_version = current.model_version

    # 1. knowledge (incremental: unchanged prompts keep their vectors; an interrupted build resumes)
    step = report.steps["build"]
    t0 = time.perf_counter()
    try:
        result = (build or run_build)(kcfg)
    except UserFacingError as exc:
        _fail(step, t0, exc, secrets)
        return _finish(report, ExitCode.USAGE, "failed", f"knowledge build: {exc}")
    except Exception as exc:  # noqa: BLE001 - any crash is reported, the rankers are untouched
        _fail(step, t0, exc, secrets, with_trace=True)
        return _finish(report, ExitCode.FAILED, "failed", f"knowledge build crashed: {exc}")
    manifest = result.manifest
    step.status, step.seconds = "ok", round(time.perf_counter() - t0, 3)
    step.detail = {
        "path": str(result.path),
        "computed": sum(manifest.computed.values()),
        "reused": sum(manifest.reused.values()),
        "computed_by_level": dict(manifest.computed),
        "reused_by_level": dict(manifest.reused),
        "counts": dict(manifest.counts),
        "parent_version": manifest.parent_version,
        "created_at": manifest.created_at,
    }
    report.knowledge_version = manifest.version
    report.knowledge_space_id = manifest.space.id

    # 2. retrain when the space changed, no usable artifact exists, or asked to
    reason = _retrain_reason(config.retrain, current, missing_why, manifest.space.id)
    step = report.steps["train"]
    if reason is None:
        step.status = "skipped"
        step.detail = {"why": "the current model reads this knowledge space" if current else "--retrain never"}
        if current is None:
            return _finish(
                report,
                ExitCode.PARTIAL,
                "partial",
                f"no usable model ({missing_why}) and --retrain never: knowledge not published",
            )
    else:
        report.retrain_reason = reason
        t0 = time.perf_counter()
        try:
            version, detail = _train(config, current, result, artifact_dir, train_fn)
        except Exception as exc:  # noqa: BLE001 - includes UserFacingError: the knowledge is kept, not published
            _fail(step, t0, exc, secrets, with_trace=not isinstance(exc, UserFacingError))
            return _finish(
                report,
                ExitCode.PARTIAL,
                "partial",
                f"retraining failed ({exc}); knowledge {manifest.version} was built but not published",
            )
        step.status, step.seconds, step.detail = "ok", round(time.perf_counter() - t0, 3), detail
        report.retrained = True
        report.model_version = version
        report.artifact_space_id = manifest.space.id

    # 3. publish (rankers following llm4msr:kn:current swap to it); without Redis, LATEST already points at it
    step = report.steps["publish"]
    if not config.redis_url:
        step.status = "skipped"
        step.detail = {"why": "no Redis URL: rankers reading the snapshot root follow its LATEST pointer"}
        report.published = False
    else:
        t0 = time.perf_counter()
        try:
            version = (publish or _default_publish)(Path(result.path), config.redis_url, config.keep_old)
        except Exception as exc:  # noqa: BLE001
            _fail(step, t0, exc, secrets, with_trace=not isinstance(exc, UserFacingError))
            return _finish(
                report,
                ExitCode.PARTIAL,
                "partial",
                f"publish failed ({exc}); rerun `llm4msr knowledge publish {result.path}` or the refresh",
            )
        step.status, step.seconds, step.detail = "ok", round(time.perf_counter() - t0, 3), {"version": version}
        report.published = True

    # 4. a new model only serves after the rankers load it
    step = report.steps["reload"]
    if not report.retrained:
        step.status = "skipped"
        step.detail = {"why": "model unchanged"}
        return _finish(report, ExitCode.OK, "ok", "")
    if not config.reload_urls:
        step.status = "skipped"
        step.detail = {"why": "no --reload-url: restart the rankers (or POST /admin/reload) to serve the new model"}
        report.rollout_required = True
        return _finish(
            report, ExitCode.ROLLOUT, "rollout", f"new model {report.model_version}: restart or reload the rankers"
        )
    t0 = time.perf_counter()
    answers, failed = {}, {}
    for url in config.reload_urls:
        try:
            answers[redact_url(url)] = (reload_fn or _default_reload)(url, config.admin_token)
        except Exception as exc:  # noqa: BLE001
            failed[redact_url(url)] = redact_text(exc, *secrets)
    step.seconds = round(time.perf_counter() - t0, 3)
    step.detail = {"reloaded": answers, "failed": failed}
    if failed:
        step.status, step.error = "failed", "; ".join(f"{u}: {e}" for u, e in failed.items())
        report.rollout_required = True
        return _finish(
            report,
            ExitCode.ROLLOUT,
            "rollout",
            f"new model {report.model_version}; {len(failed)} ranker(s) did not reload: restart them",
        )
    step.status = "ok"
    return _finish(report, ExitCode.OK, "ok", f"rankers reloaded with model {report.model_version}")


def _retrain_reason(mode: str, current, missing_why: str | None, space_id: str) -> str | None:
    if mode == "never":
        return None
    if mode == "always":
        return "--retrain always"
    if current is None:
        return missing_why
    if current.knowledge_space_id is not None and current.knowledge_space_id != space_id:
        return f"knowledge space changed ({current.knowledge_space_id} -> {space_id})"
    return None


def _train(config: RefreshConfig, current, build_result, artifact_dir: Path, train_fn) -> tuple[str, dict]:
    from offline.common import load_split
    from shared.knowledge.snapshot import KnowledgeSnapshot

    kcfg = config.knowledge
    train_cfg = train_config_from_artifact(current, config.train)
    # the split of the knowledge build (the trainer refuses knowledge built on another split: leakage guard)
    dataset, split = load_split(kcfg.data, kcfg.split)
    snapshot = KnowledgeSnapshot(build_result.path)
    return (train_fn or _default_train)(dataset, split, snapshot, train_cfg, artifact_dir)


def _fail(step: Step, t0: float, exc: BaseException, secrets: Sequence[str], with_trace: bool = False) -> None:
    step.status = "failed"
    step.seconds = round(time.perf_counter() - t0, 3)
    step.error = redact_text(f"{type(exc).__name__}: {exc}", *secrets)
    if with_trace:
        log.error("refresh step failed:\n%s", redact_text(traceback.format_exc(), *secrets))


def _finish(report: RefreshReport, code: ExitCode, outcome: str, message: str) -> RefreshReport:
    report.exit_code = int(code)
    report.outcome = outcome
    report.message = message
    report.finished_at = _now()
    return report


def _secret_urls(config: RefreshConfig) -> tuple[str, ...]:
    """Every URL the job was given: their passwords must appear in no report, error or log line."""
    return tuple(u for u in (config.redis_url, *config.reload_urls) if u)


def _scrub(report: RefreshReport, secrets: Sequence[str]) -> RefreshReport:
    """Masks URL passwords in every string of the report (messages quote exceptions, which may quote URLs)."""

    def clean(value):
        if isinstance(value, str):
            return redact_text(value, *secrets)
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clean(v) for v in value)
        return value

    for f in fields(report):
        if f.name == "steps":
            for step in report.steps.values():
                step.detail = clean(step.detail)
                step.error = clean(step.error)
        else:
            setattr(report, f.name, clean(getattr(report, f.name)))
    return report
