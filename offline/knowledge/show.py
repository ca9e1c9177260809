"""`llm4msr knowledge show`: what the LLM was asked and answered for one user, scenario or item (or, with --fit, a
user's training-only fit prompt)."""

from __future__ import annotations

import os

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge.snapshot import USER_FIT, KnowledgeSnapshot, stored_name

PROMPTS_FILE = "prompts.parquet"


def read_prompt(snapshot_dir, table: str, id_: str) -> str | None:
    """The exact prompt stored beside the snapshot (prompts.parquet), if the build wrote one; table is a level or
    USER_FIT."""
    import pyarrow.dataset as ds

    path = os.path.join(snapshot_dir, PROMPTS_FILE)
    if not os.path.exists(path):
        return None
    rows = ds.dataset(path).to_table(filter=(ds.field("level") == stored_name(table)) & (ds.field("id") == id_))
    return rows.column("prompt")[0].as_py() if len(rows) else None


def show(snapshot: str | os.PathLike, table_key: str, id_: str) -> str:
    """table_key: a level, or USER_FIT for a user's fit prompt (early train history, training only)."""
    snap = KnowledgeSnapshot(snapshot)
    table = snap.table(table_key)
    pos = table.positions([id_])[0]
    what = f"user {id_!r} (fit share {snap.manifest.fit_share})" if table_key == USER_FIT else f"{table_key} {id_!r}"
    if pos < 0:
        raise UserFacingError(f"{what} is not in knowledge {snap.version} ({len(table.ids)} {stored_name(table_key)})")
    vec = table.embeddings[pos]
    prompt = read_prompt(snap.path, table_key, id_)
    lines = [
        f"knowledge {snap.version} (space {snap.space.id}, model {snap.space.model}, mode {snap.space.mode}, "
        f"pooling {snap.space.pooling}, dim {snap.space.dim})",
        f"{what}  prompt_sha256 {table.prompt_sha256[pos][:16]}",
        "--- prompt ---",
        prompt if prompt is not None else "(not stored in this snapshot)",
        "--- answer ---",
        table.responses[pos] or "(none: encode mode embeds the prompt alone)",
        "--- vector ---",
        f"norm {float(np.linalg.norm(vec)):.4f}  dim {vec.shape[0]}  first {np.array2string(vec[:4], precision=4)}",
    ]
    return "\n".join(lines)
