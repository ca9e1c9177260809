"""The folder that the worker processes of one `llm4msr serve --workers N` share (docs/architecture.md, HTTP API).

`serve` creates it fresh for each run and removes it at exit; workers find it through LLM4MSR_RUN_DIR:

  <run>/metrics/            PROMETHEUS_MULTIPROC_DIR: prometheus-client's per-process value files
  <run>/reload.json         the latest admin reload order (ReloadOrder): every worker polls it and reloads
  <run>/workers/<pid>.json  what each worker serves now (WorkerStatus): /metrics and POST /admin/reload read it

Every write is a whole file renamed into place, so a reader never sees half of one. A worker killed with -9 leaves
its status behind; readers skip (and remove) the statuses of processes that no longer exist.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


@dataclass(frozen=True)
class ReloadOrder:
    """The model every worker should serve: the artifact of the latest POST /admin/reload (None: the one given at
    start-up); `generation` counts the orders."""

    generation: int = 0
    artifact: str | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker serves; the labels of llm4msr_versions_info come from here."""

    pid: int
    generation: int
    model_version: str
    knowledge_version: str | None
    knowledge_space_id: str | None
    backbone: str
    knowledge_store: str

    def version_labels(self) -> dict[str, str]:
        """The labels of llm4msr_versions_info."""
        return {
            "model_version": self.model_version,
            "knowledge_version": self.knowledge_version or "",
            "knowledge_space_id": self.knowledge_space_id or "",
            "backbone": self.backbone,
            "knowledge_store": self.knowledge_store,
        }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class RunDir:
    """One run's shared folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics_dir = self.path / "metrics"
        self.workers_dir = self.path / "workers"
        self._order_file = self.path / "reload.json"

    @classmethod
    def create(cls) -> RunDir:
        run = cls(tempfile.mkdtemp(prefix="llm4msr-serve-"))
        run.metrics_dir.mkdir()
        run.workers_dir.mkdir()
        return run

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def read_order(self) -> ReloadOrder:
        try:
            return ReloadOrder(**json.loads(self._order_file.read_text()))
        except FileNotFoundError:
            return ReloadOrder()

    def publish_order(self, artifact: str) -> ReloadOrder:
        """The next reload order, for every worker (a lock keeps two concurrent reloads from sharing a number)."""
        with open(self.path / "reload.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            order = ReloadOrder(self.read_order().generation + 1, artifact)
            _write_json(self._order_file, asdict(order))
        return order

    def write_status(self, status: WorkerStatus) -> None:
        _write_json(self.workers_dir / f"{status.pid}.json", asdict(status))

    def live_statuses(self) -> list[WorkerStatus]:
        """The statuses of workers that are alive, by pid; a dead worker's file is removed."""
        out = []
        for path in sorted(self.workers_dir.glob("*.json")):
            try:
                status = WorkerStatus(**json.loads(path.read_text()))
            except FileNotFoundError:  # removed by another reader meanwhile
                continue
            if pid_alive(status.pid):
                out.append(status)
            else:
                path.unlink(missing_ok=True)
        return out

    def forget_dead_workers(self) -> None:
        """Drops the live-mode gauge files of dead workers (their counters and histograms stay: they were served)."""
        from prometheus_client import multiprocess

        for path in self.metrics_dir.glob("gauge_live*.db"):
            match = _LIVE_GAUGE_FILE.fullmatch(path.name)
            if match and not pid_alive(int(match.group(1))):
                multiprocess.mark_process_dead(int(match.group(1)), str(self.metrics_dir))
