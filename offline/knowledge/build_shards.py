"""The resumable work files of a build: one Parquet file per finished shard under `<version>/_work/`
(docs/architecture.md, Knowledge snapshot).

Shards hold rows in length order, planned the same way on every run, so a resumed build finds the files of the
shards it finished and recomputes the rest with identical batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.knowledge.snapshot import stored_name

WORK = "_work"
BUILD_KEY_FILE = "build.json"


def plan_shards(pending: list[int], lengths: list[int], shard_size: int) -> list[list[int]]:
    """Shards of row indices in length order: deterministic, so a resumed build recomputes identical batches."""
    order = sorted(pending, key=lambda i: (lengths[i], i))
    return [order[s : s + shard_size] for s in range(0, len(order), shard_size)]


def shard_path(work_dir: Path, table: str, phase: str, k: int) -> Path:
    """table is a level or USER_FIT (files "users_fit-..."); phase is "gen" or "emb"."""
    return work_dir / f"{stored_name(table)}-{phase}-{k:05d}.parquet"


def write_shard(path: Path, ids: list[str], responses: list[str], emb: np.ndarray | None) -> None:
    """Written under a temporary name and renamed: a killed build leaves no half shard."""
    cols = {"id": pa.array(ids, type=pa.string()), "response": pa.array(responses, type=pa.string())}
    if emb is not None:
        dim = emb.shape[1]
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32()), dim
        )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def read_shard(path: Path) -> tuple[list[str], list[str], np.ndarray | None]:
    """(ids, responses, vectors or None for a generate shard)."""
    t = pq.read_table(path)
    emb = None
    if "embedding" in t.column_names:
        col = t.column("embedding").combine_chunks()
        emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(t), col.type.list_size)
    return t.column("id").to_pylist(), t.column("response").to_pylist(), emb
