"""`llm4msr knowledge show`: what the LLM was asked and answered for one user, scenario or item."""

from __future__ import annotations

import os

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge.levels import table_name
from shared.knowledge.snapshot import KnowledgeSnapshot

PROMPTS_FILE = "prompts.parquet"


def read_prompt(snapshot_dir, level: str, id_: str) -> str | None:
    """The exact prompt stored beside the snapshot (prompts.parquet), if the build wrote one."""
    import pyarrow.dataset as ds

    path = os.path.join(snapshot_dir, PROMPTS_FILE)
    if not os.path.exists(path):
        return None
    table = ds.dataset(path).to_table(filter=(ds.field("level") == table_name(level)) & (ds.field("id") == id_))
    return table.column("prompt")[0].as_py() if len(table) else None


def show(snapshot: str | os.PathLike, level: str, id_: str) -> str:
    snap = KnowledgeSnapshot(snapshot)
    table = snap.table(level)
    pos = table.positions([id_])[0]
    if pos < 0:
        raise UserFacingError(
            f"{level} {id_!r} is not in knowledge {snap.version} ({len(table.ids)} {table_name(level)})"
        )
    vec = table.embeddings[pos]
    prompt = read_prompt(snap.path, level, id_)
    lines = [
        f"knowledge {snap.version} (space {snap.space.id}, model {snap.space.model}, mode {snap.space.mode}, "
        f"pooling {snap.space.pooling}, dim {snap.space.dim})",
        f"{level} {id_}  prompt_sha256 {table.prompt_sha256[pos][:16]}",
        "--- prompt ---",
        prompt if prompt is not None else "(not stored in this snapshot)",
        "--- answer ---",
        table.responses[pos] or "(none: encode mode embeds the prompt alone)",
        "--- vector ---",
        f"norm {float(np.linalg.norm(vec)):.4f}  dim {vec.shape[0]}  first {np.array2string(vec[:4], precision=4)}",
    ]
    return "\n".join(lines)
