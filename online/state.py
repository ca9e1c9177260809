"""What one worker process serves: the model, the knowledge store, the metrics and, with several workers, the run
folder they share. Built once per process before it accepts requests (so /readyz is never true before the model
and knowledge are loaded); routes receive it through FastAPI dependencies (online/deps.py)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from online.knowledge import KnowledgeStore, KnowledgeVersion, RedisKnowledgeStore, SnapshotKnowledgeStore
from online.metrics import ServingMetrics
from online.ranker import Ranker, cap_torch_threads
from online.run_dir import RunDir, WorkerStatus
from online.settings import ServeSettings
from shared.errors import UserFacingError

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    settings: ServeSettings
    metrics: ServingMetrics
    ranker: Ranker  # replaced as a whole by a reload: a request keeps the one it started with
    store: KnowledgeStore | None
    run_dir: RunDir | None = None  # with several workers: the folder they share
    generation: int = 0  # the last reload order (run_dir) this worker applied
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    executor: ThreadPoolExecutor | None = None

    @property
    def ready(self) -> bool:
        return not self.ranker.uses_knowledge or (self.store is not None and self.store.ready)

    def knowledge(self) -> KnowledgeVersion | None:
        return self.store.current() if self.store is not None else None

    def status(self) -> WorkerStatus:
        kv = self.knowledge()
        return WorkerStatus(
            pid=os.getpid(),
            generation=self.generation,
            model_version=self.ranker.model_version,
            knowledge_version=kv.version if kv is not None else None,
            knowledge_space_id=kv.space_id if kv is not None else None,
            backbone=self.ranker.backbone,
            knowledge_store=self.store.kind if self.store is not None else "none",
        )

    def publish_versions(self) -> None:
        """Versions into the metrics and, with several workers, into this worker's status in the run folder."""
        status = self.status()
        self.metrics.versions.info(status.version_labels())
        kv = self.knowledge()
        created = _parse_time(kv.manifest.created_at) if kv is not None else None
        if created is not None:
            self.metrics.knowledge_created.set(created)
        if self.run_dir is not None:
            self.run_dir.write_status(status)

    def update_gauges(self) -> None:
        """Gauges read from the store's state (on every poll, and before a scrape)."""
        if isinstance(self.store, RedisKnowledgeStore):
            self.metrics.redis_up.set(1.0 if self.store.redis_up else 0.0)

    def close(self) -> None:
        if self.store is not None:
            self.store.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False)


def build_store(settings: ServeSettings, ranker: Ranker) -> KnowledgeStore | None:
    if settings.redis_url:
        return RedisKnowledgeStore(
            settings.redis_url,
            ranker.knowledge_space_id,
            poll_interval_s=settings.poll_interval_s,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            user_cache_size=settings.user_cache_size,
            item_preload_limit=settings.item_preload_limit,
        )
    if settings.knowledge:
        return SnapshotKnowledgeStore(
            settings.knowledge, ranker.knowledge_space_id, settings.poll_interval_s, settings.knowledge_cache_dir
        )
    if ranker.uses_knowledge:
        raise UserFacingError(
            f"model {ranker.model_version} uses {sorted(ranker.needs_levels)} knowledge: pass --knowledge SNAPSHOT "
            "or --redis-url URL (or set LLM4MSR_KNOWLEDGE / LLM4MSR_REDIS_URL)"
        )
    return None


def load_state(settings: ServeSettings) -> ServingState:
    """Loads the model (the latest reload order's, with several workers) and the knowledge; raises
    UserFacingError (e.g. knowledge space mismatch) before serving."""
    if not settings.artifact:
        raise UserFacingError("no model artifact given: pass --artifact DIR (or set LLM4MSR_ARTIFACT)")
    cap_torch_threads(settings.torch_threads)
    if settings.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    run_dir = RunDir(settings.run_dir) if settings.run_dir else None
    order = run_dir.read_order() if run_dir is not None else None
    ranker = Ranker.load(
        order.artifact if order is not None and order.artifact else settings.artifact, traced=settings.traced_forward
    )
    check_field_limit(ranker, settings)
    store = build_store(settings, ranker)
    state = ServingState(settings, ServingMetrics(), ranker, store, run_dir, order.generation if order else 0)
    if settings.rank_executor != "inline":
        state.executor = ThreadPoolExecutor(max_workers=settings.max_concurrent_forwards, thread_name_prefix="rank")
    if store is not None:
        store.on_swap = lambda kv: _on_swap(state, kv)
        store.on_poll = state.update_gauges
        store.start()
    state.update_gauges()
    state.publish_versions()
    return state


def _on_swap(state: ServingState, kv: KnowledgeVersion) -> None:
    state.metrics.swaps.inc()
    state.publish_versions()
    if state.ranker.needs_items and kv.items_complete:
        state.ranker.reduced_items(kv)  # before requests need it


def check_field_limit(ranker: Ranker, settings: ServeSettings) -> None:
    """A model reading more candidate fields than a request may carry would refuse its own valid requests."""
    if len(ranker.feature_fields) > settings.max_candidate_fields:
        raise UserFacingError(
            f"model {ranker.model_version} reads {len(ranker.feature_fields)} candidate feature fields but "
            f"max_candidate_fields is {settings.max_candidate_fields}; raise LLM4MSR_MAX_CANDIDATE_FIELDS"
        )


def reload_model(state: ServingState, artifact: str, generation: int | None = None) -> None:
    """Loads `artifact` and swaps it in with knowledge of its space; the old model serves until then. `generation`:
    the reload order (run folder) this applies."""
    with state.reload_lock:
        if generation is not None and generation <= state.generation:
            return  # applied already (this worker wrote the order)
        new = Ranker.load(artifact, traced=state.settings.traced_forward)
        check_field_limit(new, state.settings)
        if new.uses_knowledge and state.store is None:
            raise UserFacingError("the new model needs knowledge but the service was started without any")
        kv = state.knowledge()
        if new.needs_items and kv is not None and kv.items_complete and kv.space_id == new.knowledge_space_id:
            new.reduced_items(kv)  # before requests need it

        def swap() -> None:
            state.ranker = new

        if state.store is not None and new.uses_knowledge:
            state.store.adopt_space(new.knowledge_space_id, swap)
        else:
            swap()
        if generation is not None:
            state.generation = generation
        state.publish_versions()
        log.info("reload: now serving model %s", new.model_version)


def _parse_time(text: str) -> float | None:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
