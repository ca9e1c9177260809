"""The write step of a build: the level tables and the fit user table, the cold-start user vector and the prompts
beside them, then the manifest (last: it makes the version visible) and LATEST; the work files and abandoned builds
go (docs/architecture.md, Knowledge snapshot)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from offline.knowledge import prompts as P
from offline.knowledge.build_phases import ComputedKnowledge
from offline.knowledge.build_plan import BuildPlan, RawVectors, TableWork
from offline.knowledge.build_reduce import Reduction
from offline.knowledge.build_shards import BUILD_KEY_FILE, WORK
from offline.knowledge.show import PROMPTS_FILE
from shared.knowledge.levels import LEVELS
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    DEFAULTS,
    MANIFEST,
    USER_FIT,
    KnowledgeTable,
    Manifest,
    TableCounts,
    stored_name,
    write_manifest,
    write_table,
)


@dataclass(frozen=True)
class WrittenCounts:
    """Rows per table in the new version: all of them, computed by the LLM in this build, reused from the parent."""

    tables: dict[str, TableCounts]

    def per_level(self, field: str) -> dict[str, int]:
        """The manifest's per-level field ("count", "computed" or "reused"): the three levels only."""
        return {level: getattr(self.tables[level], field) for level in LEVELS}


def write_tables(plan: BuildPlan, computed: RawVectors, reduction: Reduction) -> WrittenCounts:
    """Every table (fresh vectors reduced, reused ones as the parent stored them), the cold-start user vector and the
    prompts file."""
    counts = {}
    for name, work in plan.tables.items():
        table = _vector_table(work, computed[name], reduction, plan.reduce_reused)
        write_table(plan.version_dir / f"{stored_name(name)}.parquet", table)
        fresh = sum(1 for id_ in work.ids if id_ in computed[name])
        counts[name] = TableCounts(count=len(work.ids), computed=fresh, reused=len(work.reused))
        if name == "user":  # the serve vectors: what a cold-start user is served in their place
            _write_default_user(plan.version_dir, table.embeddings, reduction.space.dim)
    _write_prompts(plan.version_dir, plan.tables)
    return WrittenCounts(counts)


def write_version(
    plan: BuildPlan, computed: ComputedKnowledge, reduction: Reduction, counts: WrittenCounts, seconds: float
) -> Manifest:
    """Writes the manifest and LATEST, then removes the work files and abandoned unfinished versions."""
    config = plan.config
    manifest = Manifest(
        version=plan.version_dir.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        space=reduction.space,
        dataset_fingerprint=plan.dataset_fingerprint,
        split_fingerprint=plan.split_fingerprint,
        counts=counts.per_level("count"),
        backend=config.backend.backend,
        parent_version=plan.parent.version if plan.parent else None,
        computed=counts.per_level("computed"),
        reused=counts.per_level("reused"),
        dtype=plan.dtype.dtype,
        hardware=plan.dtype.to_dict(),
        truncated=computed.truncated,
        fit_share=config.fit_share if config.builds_fit_vectors else None,
        fit_counts=counts.tables.get(USER_FIT),
        extra={
            "dataset": plan.dataset_name,
            "split_config": config.split.to_dict(),
            "prompt_config": config.prompts.to_dict(),
            "generation": plan.generation,
            "backend_config": {k: v for k, v in asdict(config.backend).items() if k != "vllm_python"},
            "engine": config.engine,
            "templates": P.TEMPLATES,
            "default_user": "mean of user vectors",
            "rates": computed.rates,
            "build_seconds": round(seconds, 3),
        },
    )
    write_manifest(plan.version_dir, manifest)
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    _prune_unfinished(plan.root, keep=plan.version_dir)
    return manifest


def _vector_table(
    work: TableWork, computed: dict[str, tuple[str, np.ndarray]], reduction: Reduction, reduce_reused: bool
) -> KnowledgeTable:
    """The table's rows in id order: computed vectors reduced, reused ones as the parent stored them (reduced too
    when they are the LLM's own and this build fits a reducer)."""
    emb = np.zeros((len(work.ids), reduction.space.dim), dtype=np.float32)
    responses = []
    raw_rows, raw_positions = [], []
    for j, id_ in enumerate(work.ids):
        if id_ in computed:
            response, vector = computed[id_]
            raw = True
        else:
            response, vector = work.reused[id_]
            raw = reduce_reused
        responses.append(response)
        if raw:
            raw_rows.append(vector)
            raw_positions.append(j)
        else:
            emb[j] = vector
    if raw_rows:
        emb[raw_positions] = reduction.apply(np.stack(raw_rows))
    return KnowledgeTable(work.ids, emb, work.hashes, responses)


def _write_default_user(version_dir: Path, user_vectors: np.ndarray, dim: int) -> None:
    """Cold-start users get the mean user vector: it lies in the distribution the model was trained on, unlike the
    vector of an empty-history prompt."""
    default = user_vectors.mean(0, keepdims=True) if len(user_vectors) else np.zeros((1, dim), np.float32)
    write_table(
        version_dir / f"{DEFAULTS}.parquet", KnowledgeTable([DEFAULT_USER_ID], default, ["mean-of-users"], [""])
    )


def _write_prompts(version_dir: Path, tables: dict[str, TableWork]) -> None:
    """The exact prompts beside the vectors (for `knowledge show` and audits); not part of the contract. Its level
    column holds the table's stored name ("users_fit" for the fit prompts)."""
    lv, ids, texts = [], [], []
    for name, work in tables.items():
        lv += [stored_name(name)] * len(work.ids)
        ids += work.ids
        texts += work.texts
    table = pa.table({"level": lv, "id": ids, "prompt": texts})
    tmp = version_dir / (PROMPTS_FILE + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, version_dir / PROMPTS_FILE)


def _prune_unfinished(root: Path, keep: Path) -> None:
    """Removes abandoned unfinished versions (their inputs changed; they can never resume)."""
    for d in root.iterdir():
        if d.is_dir() and d != keep and not (d / MANIFEST).exists() and (d / WORK / BUILD_KEY_FILE).exists():
            shutil.rmtree(d, ignore_errors=True)
