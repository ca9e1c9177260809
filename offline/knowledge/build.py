"""The knowledge build: plan -> phases (generate, embed) -> reduce -> write (docs/architecture.md, Knowledge snapshot).

Each step is a module of its own and hands the next one typed data:

- plan (build_plan.py): data, prompts, the parent version and what it lends, the version folder -> BuildPlan;
- phases (build_phases.py): the LLM work, shard by shard through an executor -> ComputedKnowledge;
- reduce (build_reduce.py): the optional PCA of the knowledge space -> Reduction;
- write (build_write.py): tables, manifest (last), LATEST -> Manifest.

Resumable: every finished shard of work is a Parquet file under `<version>/_work/`; a rerun of the same build
finds the unfinished version (same inputs -> same build key), skips finished shards and computes the rest with the
same batches, so the result equals an uninterrupted run. The manifest is written last.

Incremental: a row whose prompt hash equals the one in the previous version (same knowledge space and generation
settings) keeps its vector and answer without an LLM call.

Fit user vectors (`fit_share` > 0, the leak-free training protocol): a fourth table, USER_FIT, whose prompts are the
user template over each user's early train history (offline/data/fit_cutoff.py). It goes through every step like a
level (generated and embedded in the same mode, resumed, reused by prompt hash, reduced with the same reducer) but
is written as users_fit.parquet for training only; it is not part of the knowledge space.

Texts longer than the backend's max_length are cut to it (the same way by both backends); the build counts them per
level and phase, warns once with the total, and records the counts in the manifest and the summary line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offline.knowledge.build_config import KnowledgeConfig
from offline.knowledge.build_phases import ShardCallback, run_phases
from offline.knowledge.build_plan import BuildPlan, load_token_counter, plan_build
from offline.knowledge.build_plan import new_version as _new_version
from offline.knowledge.build_reduce import reduce_step
from offline.knowledge.build_shards import plan_shards
from offline.knowledge.build_write import write_tables, write_version
from offline.knowledge.executor import Executor
from offline.knowledge.executors import make_executor
from shared.knowledge.levels import LEVELS, table_name
from shared.knowledge.snapshot import USER_FIT, Manifest, stored_name

# Imported from here by other code: the config, and the version naming (tests/test_knowledge_keys.py).
__all__ = ["BuildResult", "KnowledgeConfig", "_new_version", "load_token_counter", "plan_shards", "run_build"]

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    seconds: float

    def summary(self) -> str:
        """One line; its users/s are the computed serve users over the whole build's time (fit phase included)."""
        m = self.manifest
        parts = [
            f"{table_name(lvl)} {m.counts.get(lvl, 0)} ({m.computed.get(lvl, 0)} computed, {m.reused.get(lvl, 0)} reused)"
            for lvl in LEVELS
        ]
        if m.fit_counts is not None:
            fit = m.fit_counts
            parts.insert(
                2,
                f"{stored_name(USER_FIT)} {fit.count} ({fit.computed} computed, {fit.reused} reused; "
                f"fit share {m.fit_share})",
            )
        users = m.computed.get("user", 0)
        rate = users / self.seconds if self.seconds > 0 else 0.0
        return (
            f"knowledge {m.version}: " + ", ".join(parts) + f"; dim {m.space.dim}, space {m.space.id}, "
            f"{m.backend} {m.dtype}, {sum(m.truncated.values())} texts cut to {m.space.max_length} tokens, "
            f"{self.seconds:.1f} s ({rate:.2f} computed serve users/s) -> {self.path}"
        )


def run_build(
    config: KnowledgeConfig,
    executor_factory: Callable[[], Executor] | None = None,
    on_shard: ShardCallback | None = None,
) -> BuildResult:
    """Builds (or resumes) one snapshot version under config.out.

    executor_factory: starts the executor of the LLM work (default: the configured engine from the registry);
    on_shard(table, phase, k) follows each shard as it is written (table: a level or USER_FIT).
    """
    start = time.perf_counter()
    plan = plan_build(config)
    computed = run_phases(plan, executor_factory or _configured_executor(plan), on_shard)
    _warn_truncated(computed.truncated, plan.config.backend.max_length)
    reduction = reduce_step(plan, computed.vectors)
    counts = write_tables(plan, computed.vectors, reduction)
    seconds = time.perf_counter() - start
    manifest = write_version(plan, computed, reduction, counts, seconds)
    return BuildResult(plan.version_dir, manifest, seconds)


def _configured_executor(plan: BuildPlan) -> Callable[[], Executor]:
    """The engine of the config, with the resolved dtype (so that Ray workers run the same one)."""
    config = plan.config
    return lambda: make_executor(config.engine, config.backend, config.engine_options)


def _warn_truncated(truncated: dict[str, int], max_length: int) -> None:
    """One warning for the whole build (not one line per text): cut texts lose their end, which is the question
    (prompts) or the answer (generate-mode embeddings)."""
    total = sum(truncated.values())
    if total:
        where = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in truncated.items() if n)
        log.warning(
            "%d text(s) were longer than max_length %d tokens and were cut to it (%s); their end is lost: lower "
            "--history-token-budget or raise --max-length",
            total,
            max_length,
            where,
        )
