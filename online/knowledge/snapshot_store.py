"""Knowledge read from a Parquet snapshot (the embedded default, no Redis); follows a root's LATEST."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from online.knowledge.base import (
    UNKNOWN,
    Fallback,
    Fetched,
    KnowledgeStore,
    KnowledgeVersion,
    missing_item_fallbacks,
    table_to_items,
)
from shared.errors import UserFacingError
from shared.knowledge.snapshot import LATEST, KnowledgeSnapshot, KnowledgeTable, resolve_snapshot_dir

log = logging.getLogger(__name__)


class SnapshotKnowledgeStore(KnowledgeStore):
    """Knowledge straight from a Parquet snapshot (no Redis): everything in memory."""

    kind = "snapshot"

    def __init__(self, path: str | Path, expected_space_id: str | None, poll_interval_s: float = 1.0):
        super().__init__(expected_space_id, poll_interval_s)
        self.path = Path(path)
        # A knowledge root (with LATEST) is followed; a version folder is fixed.
        self.follow = (self.path / LATEST).exists() and not (self.path / "manifest.json").exists()

    def _target(self) -> Path:
        return resolve_snapshot_dir(self.path)

    def refresh(self, initial: bool = False) -> None:
        if not initial and not self.follow:
            return
        target = self._target()
        cur = self._current
        if cur is not None and target.name == cur.version:
            return
        if not initial and target.name in self.refused:
            return
        self._install(self.load(target), initial)

    def load_published(self) -> KnowledgeVersion | None:
        return self.load(self._target())

    @staticmethod
    def load(path: Path) -> KnowledgeVersion:
        snap = KnowledgeSnapshot(path)
        scen = snap.scenarios()
        users = snap.users()
        try:
            items = snap.items()
        except UserFacingError:
            items = KnowledgeTable([], np.zeros((0, scen.dim), np.float32), [], [])
        return KnowledgeVersion(
            version=snap.version,
            manifest=snap.manifest,
            dim=scen.dim,
            scenarios={sid: scen.embeddings[i] for i, sid in enumerate(scen.ids)},
            scenario_responses={sid: scen.responses[i] or "" for i, sid in enumerate(scen.ids)},
            default_user=snap.default_user(),
            items=table_to_items(items),
            users=users,
            user_rows={id_: i for i, id_ in enumerate(users.ids)},
        )

    def fetch(self, kv: KnowledgeVersion, user_id: str, item_ids: Sequence[str] | None, need_user: bool) -> Fetched:
        fallbacks: list[Fallback] = []
        user_vec = None
        if need_user:
            assert kv.users is not None and kv.user_rows is not None
            pos = kv.user_rows.get(user_id, -1)
            if pos >= 0:
                user_vec = kv.users.embeddings[pos]
            else:
                user_vec = kv.default_user
                fallbacks.append(Fallback("user", UNKNOWN))
        item_vecs = None
        if item_ids is not None:
            item_vecs, found = self._items_from_memory(kv, item_ids)
            fallbacks.extend(missing_item_fallbacks(kv, item_ids, found))
        return Fetched(user_vec, item_vecs, fallbacks)

    def user_response(self, kv: KnowledgeVersion, user_id: str) -> tuple[str | None, list[Fallback]]:
        assert kv.users is not None
        return kv.users.response_of(user_id), []
