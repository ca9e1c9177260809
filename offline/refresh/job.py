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
from typing import TYPE_CHECKING

from shared.errors import UserFacingError
from shared.redact import redact_text, redact_url

if TYPE_CHECKING:
    from offline.data.split import Split
    from offline.knowledge.build import BuildResult, KnowledgeConfig
    from offline.training.config import TrainConfig
    from shared.artifact import ArtifactConfig
    from shared.dataset.folder import Dataset
    from shared.knowledge.snapshot import KnowledgeSnapshot

    BuildFn = Callable[[KnowledgeConfig], BuildResult]
    TrainFn = Callable[[Dataset, Split, KnowledgeSnapshot, TrainConfig, Path], tuple[str, dict]]
    PublishFn = Callable[[Path, str, int], str]  # snapshot folder, Redis URL, versions kept -> published version
    ReloadFn = Callable[[str, str], dict]  # ranker URL, admin token -> its answer

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
    knowledge: KnowledgeConfig  # data, out = the knowledge root, backend, split ...
    artifact_dir: str
    redis_url: str | None = None
    keep_old: int = 1
    retrain: str = "auto"
    # Used when no artifact exists yet (else the current artifact's own training config is reused); None = defaults.
    train: TrainConfig | None = None
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


def _current_artifact(artifact_dir: Path) -> tuple[ArtifactConfig | None, str | None]:
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


def train_config_from_artifact(cfg: ArtifactConfig | None, fallback: TrainConfig | None) -> TrainConfig:
    """Retrains with what the current model was trained with (backbone, levels or --levels auto, protocol,
    hyper-parameters). A setting newer than the artifact keeps the behaviour it was trained with (config.fill_absent:
    e.g. an artifact from before gates retrains ungated, on the full-history protocol)."""
    from offline.training.config import TrainConfig, fill_absent

    base = fallback if fallback is not None else TrainConfig()
    if cfg is None or not cfg.train:
        return base
    stored = fill_absent({k: v for k, v in cfg.train.items() if k in TrainConfig.flat_keys()})
    return TrainConfig.from_flat({**base.to_dict(), **stored, "progress": False})


def _default_train(
    dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot, train_cfg: TrainConfig, out: Path
) -> tuple[str, dict]:
    from offline.training.trainer import train
    from shared.artifact import read_artifact_config, save_artifact

    result = train(dataset, split, snapshot, train_cfg)
    save_artifact(out, result.model, result.encoder, result.artifact_fields(split), overwrite=True)
    cfg = read_artifact_config(out)
    overall = result.metrics.get("test", {}).get("overall", {}) if isinstance(result.metrics, dict) else {}
    selection = result.level_selection
    return cfg.model_version, {
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 2),
        "test_auc": overall.get("auc"),
        "backbone": cfg.backbone,
        "levels": cfg.levels,
        **({"level_selection": selection.to_dict()} if selection else {}),
    }


def _default_build(config: KnowledgeConfig) -> BuildResult:
    from offline.knowledge.build import run_build

    return run_build(config)


def _default_publish(snapshot_dir: Path, redis_url: str, keep_old: int) -> str:
    from offline.knowledge.publish import publish_snapshot

    return publish_snapshot(snapshot_dir, redis_url, keep_old=keep_old)


def _default_reload(url: str, token: str) -> dict:
    import httpx

    r = httpx.post(url.rstrip("/") + "/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


@dataclass(frozen=True)
class StepFunctions:
    """The work behind each step; tests replace one to inject a failure."""

    build: BuildFn = _default_build
    train: TrainFn = _default_train
    publish: PublishFn = _default_publish
    reload: ReloadFn = _default_reload


def run_refresh(
    config: RefreshConfig,
    *,
    build: BuildFn | None = None,
    train_fn: TrainFn | None = None,
    publish: PublishFn | None = None,
    reload_fn: ReloadFn | None = None,
) -> RefreshReport:
    """Runs the job; never raises for an expected failure: the outcome is in the report's exit code.

    build/train_fn/publish/reload_fn replace the real steps (tests inject failures with them).
    """
    given = {"build": build, "train": train_fn, "publish": publish, "reload": reload_fn}
    steps = StepFunctions(**{name: fn for name, fn in given.items() if fn is not None})
    root = Path(config.knowledge.out)
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
        report = _RefreshRun(config, report, root, artifact_dir, steps).run()
    finally:
        lock.release()
    return _scrub(report, _secret_urls(config))


@dataclass(frozen=True)
class _Stop:
    """How a step ends the job."""

    code: ExitCode
    outcome: str
    message: str


@dataclass
class _RefreshRun:
    """One run of the job: the steps in order, each either passing on or ending the job with a _Stop."""

    config: RefreshConfig
    report: RefreshReport
    root: Path
    artifact_dir: Path
    steps: StepFunctions
    current: ArtifactConfig | None = None  # the artifact before this run
    missing_why: str | None = None  # why there is no usable current artifact
    built: BuildResult | None = None

    def run(self) -> RefreshReport:
        report = self.report
        report.previous_knowledge_version = _previous_version(self.root)
        self.current, self.missing_why = _current_artifact(self.artifact_dir)
        if self.current is not None:
            report.previous_model_version = self.current.model_version
            report.artifact_space_id = self.current.knowledge_space_id
            report.model_version = self.current.model_version
        for step in (self.build, self.retrain, self.publish, self.reload):
            stop = step()
            if stop is not None:
                return _finish(report, stop.code, stop.outcome, stop.message)
        raise AssertionError("the reload step always ends the job")  # pragma: no cover

    @property
    def secrets(self) -> tuple[str, ...]:
        return _secret_urls(self.config)

    def build(self) -> _Stop | None:
        """1. knowledge (incremental: unchanged prompts keep their vectors; an interrupted build resumes)."""
        step = self.report.steps["build"]
        t0 = time.perf_counter()
        try:
            self.built = self.steps.build(self.config.knowledge)
        except UserFacingError as exc:
            _fail(step, t0, exc, self.secrets)
            return _Stop(ExitCode.USAGE, "failed", f"knowledge build: {exc}")
        except Exception as exc:  # noqa: BLE001 - any crash is reported, the rankers are untouched
            _fail(step, t0, exc, self.secrets, with_trace=True)
            return _Stop(ExitCode.FAILED, "failed", f"knowledge build crashed: {exc}")
        manifest = self.built.manifest
        step.status, step.seconds = "ok", round(time.perf_counter() - t0, 3)
        step.detail = {
            "path": str(self.built.path),
            "computed": sum(manifest.computed.values()),
            "reused": sum(manifest.reused.values()),
            "computed_by_level": dict(manifest.computed),
            "reused_by_level": dict(manifest.reused),
            "counts": dict(manifest.counts),
            "parent_version": manifest.parent_version,
            "created_at": manifest.created_at,
        }
        self.report.knowledge_version = manifest.version
        self.report.knowledge_space_id = manifest.space.id
        return None

    def retrain(self) -> _Stop | None:
        """2. retrain when the space changed, no usable artifact exists, or asked to."""
        manifest, step = self.built.manifest, self.report.steps["train"]
        reason = _retrain_reason(self.config.retrain, self.current, self.missing_why, manifest.space.id)
        if reason is None:
            step.status = "skipped"
            step.detail = {"why": "the current model reads this knowledge space" if self.current else "--retrain never"}
            if self.current is None:
                why = f"no usable model ({self.missing_why}) and --retrain never: knowledge not published"
                return _Stop(ExitCode.PARTIAL, "partial", why)
            return None
        self.report.retrain_reason = reason
        t0 = time.perf_counter()
        try:
            version, detail = self._train()
        except Exception as exc:  # noqa: BLE001 - includes UserFacingError: the knowledge is kept, not published
            _fail(step, t0, exc, self.secrets, with_trace=not isinstance(exc, UserFacingError))
            why = f"retraining failed ({exc}); knowledge {manifest.version} was built but not published"
            return _Stop(ExitCode.PARTIAL, "partial", why)
        step.status, step.seconds, step.detail = "ok", round(time.perf_counter() - t0, 3), detail
        self.report.retrained = True
        self.report.model_version = version
        self.report.artifact_space_id = manifest.space.id
        return None

    def _train(self) -> tuple[str, dict]:
        from offline.common import load_split
        from shared.knowledge.snapshot import KnowledgeSnapshot

        kcfg = self.config.knowledge
        train_cfg = train_config_from_artifact(self.current, self.config.train)
        # the split of the knowledge build (the trainer refuses knowledge built on another split: leakage guard)
        dataset, split = load_split(kcfg.data, kcfg.split)
        snapshot = KnowledgeSnapshot(self.built.path)
        return self.steps.train(dataset, split, snapshot, train_cfg, self.artifact_dir)

    def publish(self) -> _Stop | None:
        """3. publish (rankers following llm4msr:kn:current swap to it); without Redis, LATEST already points at it."""
        step = self.report.steps["publish"]
        if not self.config.redis_url:
            step.status = "skipped"
            step.detail = {"why": "no Redis URL: rankers reading the snapshot root follow its LATEST pointer"}
            self.report.published = False
            return None
        t0 = time.perf_counter()
        try:
            version = self.steps.publish(Path(self.built.path), self.config.redis_url, self.config.keep_old)
        except Exception as exc:  # noqa: BLE001
            _fail(step, t0, exc, self.secrets, with_trace=not isinstance(exc, UserFacingError))
            why = f"publish failed ({exc}); rerun `llm4msr knowledge publish {self.built.path}` or the refresh"
            return _Stop(ExitCode.PARTIAL, "partial", why)
        step.status, step.seconds, step.detail = "ok", round(time.perf_counter() - t0, 3), {"version": version}
        self.report.published = True
        return None

    def reload(self) -> _Stop:
        """4. a new model only serves after the rankers load it."""
        report, step = self.report, self.report.steps["reload"]
        if not report.retrained:
            step.status, step.detail = "skipped", {"why": "model unchanged"}
            return _Stop(ExitCode.OK, "ok", "")
        if not self.config.reload_urls:
            step.status = "skipped"
            step.detail = {"why": "no --reload-url: restart the rankers (or POST /admin/reload) to serve the new model"}
            report.rollout_required = True
            why = f"new model {report.model_version}: restart or reload the rankers"
            return _Stop(ExitCode.ROLLOUT, "rollout", why)
        t0 = time.perf_counter()
        answers, failed = {}, {}
        for url in self.config.reload_urls:
            try:
                answers[redact_url(url)] = self.steps.reload(url, self.config.admin_token)
            except Exception as exc:  # noqa: BLE001
                failed[redact_url(url)] = redact_text(exc, *self.secrets)
        step.seconds = round(time.perf_counter() - t0, 3)
        step.detail = {"reloaded": answers, "failed": failed}
        if failed:
            step.status, step.error = "failed", "; ".join(f"{u}: {e}" for u, e in failed.items())
            report.rollout_required = True
            why = f"new model {report.model_version}; {len(failed)} ranker(s) did not reload: restart them"
            return _Stop(ExitCode.ROLLOUT, "rollout", why)
        step.status = "ok"
        return _Stop(ExitCode.OK, "ok", f"rankers reloaded with model {report.model_version}")


def _retrain_reason(mode: str, current: ArtifactConfig | None, missing_why: str | None, space_id: str) -> str | None:
    if mode == "never":
        return None
    if mode == "always":
        return "--retrain always"
    if current is None:
        return missing_why
    if current.knowledge_space_id is not None and current.knowledge_space_id != space_id:
        return f"knowledge space changed ({current.knowledge_space_id} -> {space_id})"
    return None


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
