"""Knowledge read from a Parquet snapshot (the embedded default, no Redis); follows a root's LATEST.

Parquet is compressed, so reading it gives every process its own copy of the vectors. The first load of a version
therefore converts its tables once into uncompressed Arrow IPC files in a cache folder (keyed by the snapshot's
path, manifest and file sizes and times; written under a lock, renamed into place), and every load maps those
files: the vectors of N worker processes are one set of shared, read-only pages (docs/architecture.md, Knowledge
snapshot). Without a writable cache folder the tables are read into memory, as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from online.knowledge.base import (
    UNKNOWN,
    Fallback,
    Fetched,
    ItemVectors,
    KnowledgeStore,
    KnowledgeVersion,
    UserVectors,
    missing_item_fallbacks,
)
from shared.errors import UserFacingError
from shared.knowledge.levels import LEVELS, table_name
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    DEFAULTS,
    LATEST,
    MANIFEST,
    KnowledgeSnapshot,
    read_table,
    resolve_snapshot_dir,
    table_to_arrow,
)

log = logging.getLogger(__name__)

TABLES = (*(table_name(level) for level in LEVELS), DEFAULTS)
KEEP_CACHED_VERSIONS = 4  # converted versions kept in the cache folder (the newest)


def default_cache_dir() -> Path:
    """$LLM4MSR_CACHE/knowledge-mmap, else ~/.cache/llm4msr/knowledge-mmap."""
    root = os.environ.get("LLM4MSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm4msr")
    return Path(root) / "knowledge-mmap"


class SnapshotKnowledgeStore(KnowledgeStore):
    """Knowledge straight from a Parquet snapshot (no Redis): vectors memory-mapped, ids in memory."""

    kind = "snapshot"

    def __init__(
        self,
        path: str | Path,
        expected_space_id: str | None,
        poll_interval_s: float = 1.0,
        cache_dir: str | Path | None = None,
    ):
        super().__init__(expected_space_id, poll_interval_s)
        self.path = Path(path)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        # A knowledge root (with LATEST) is followed; a version folder is fixed.
        self.follow = (self.path / LATEST).exists() and not (self.path / MANIFEST).exists()

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

    def load(self, path: Path) -> KnowledgeVersion:
        snap = KnowledgeSnapshot(path)
        tables = self._arrow_tables(snap)
        scen_ids, scen_vecs = _ids_and_vectors(tables["scenarios"])
        user_ids, user_vecs = _ids_and_vectors(tables["users"])
        item_ids, item_vecs = _ids_and_vectors(tables["items"], dim=scen_vecs.shape[1])
        default_ids, default_vecs = _ids_and_vectors(tables[DEFAULTS])
        if DEFAULT_USER_ID not in default_ids:
            raise UserFacingError(f"snapshot {snap.path} has no default user vector")
        scen_answers = tables["scenarios"].column("response").to_pylist()
        return KnowledgeVersion(
            version=snap.version,
            manifest=snap.manifest,
            dim=scen_vecs.shape[1],
            scenarios={sid: scen_vecs[i] for i, sid in enumerate(scen_ids)},
            scenario_responses={sid: scen_answers[i] or "" for i, sid in enumerate(scen_ids)},
            default_user=default_vecs[default_ids.index(DEFAULT_USER_ID)],
            items=ItemVectors(item_ids, item_vecs),
            users=UserVectors(
                {id_: i for i, id_ in enumerate(user_ids)}, user_vecs, tables["users"].column("response")
            ),
        )

    def _arrow_tables(self, snap: KnowledgeSnapshot) -> dict[str, pa.Table]:
        """Each table of the version: mapped from the cache (converted on first use), else read into memory."""
        try:
            folder = self._cached(snap)
        except OSError as exc:  # e.g. a read-only file system: correct, only not shared between workers
            log.warning("cannot cache knowledge %s for memory mapping (%s); reading it into memory", snap.version, exc)
            return {name: _arrow_from_parquet(snap.path, name) for name in TABLES}
        return {name: _map_arrow(folder / f"{name}.arrow") for name in TABLES}

    def _cached(self, snap: KnowledgeSnapshot) -> Path:
        """The version's cache folder, converting the snapshot under a lock when no process did yet."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        folder = self.cache_dir / f"{snap.version}-{_snapshot_key(snap.path)}"
        if folder.is_dir():
            return folder
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others wait, then map its files
            if not folder.is_dir():
                _convert(snap.path, folder)
                log.info("knowledge %s converted for memory mapping into %s", snap.version, folder)
                _prune(self.cache_dir, keep=KEEP_CACHED_VERSIONS)
        return folder

    def fetch(self, kv: KnowledgeVersion, user_id: str, item_ids: Sequence[str] | None, need_user: bool) -> Fetched:
        fallbacks: list[Fallback] = []
        user_vec = None
        if need_user:
            assert kv.users is not None
            pos = kv.users.rows.get(user_id, -1)
            if pos >= 0:
                user_vec = kv.users.matrix[pos]
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


def _snapshot_key(path: Path) -> str:
    """Changes when the snapshot at this path is rewritten: its manifest and its files' sizes and times."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    digest.update((path / MANIFEST).read_bytes())
    for name in TABLES:
        file = path / f"{name}.parquet"
        if file.exists():
            st = file.stat()
            digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _arrow_from_parquet(folder: Path, name: str) -> pa.Table:
    """One table of the snapshot, checked by the snapshot reader (a ragged vector column is one clear error)."""
    file = folder / f"{name}.parquet"
    if not file.exists():
        if name == table_name("item"):  # a snapshot without item knowledge
            return pa.table({"id": pa.array([], pa.string()), "response": pa.array([], pa.string())})
        raise UserFacingError(f"snapshot {folder} has no {name}.parquet")
    return table_to_arrow(read_table(file))


def _convert(snapshot: Path, folder: Path) -> None:
    """Every table of the snapshot as an uncompressed Arrow IPC file, in a temporary folder renamed into place."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in TABLES:
            table = _arrow_from_parquet(snapshot, name)
            with pa.OSFile(str(tmp / f"{name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pa.default_memory_pool().release_unused()  # the tables read for it: else the allocator keeps their pages


def _map_arrow(path: Path) -> pa.Table:
    """The table backed by the file's pages (no copy: numpy views of its vectors read the mapping)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _ids_and_vectors(table: pa.Table, dim: int | None = None) -> tuple[list[str], np.ndarray]:
    """The ids and a read-only [n, dim] float32 view of the vectors (zero-copy for a mapped table)."""
    ids = table.column("id").to_pylist()
    if "embedding" not in table.column_names:  # an absent item table
        return ids, np.zeros((0, dim or 0), np.float32)
    column = table.column("embedding")
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    width = chunk.type.list_size
    flat = chunk.flatten().to_numpy(zero_copy_only=len(chunk) > 0)
    return ids, flat.reshape(len(ids), width)


def _prune(cache_dir: Path, keep: int) -> None:
    """Removes all but the newest `keep` converted versions (a process still mapping one keeps its pages)."""
    folders = sorted(
        (p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=os.path.getmtime
    )
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
