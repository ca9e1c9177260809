"""The reduce step of a build: the optional PCA that defines a reduced knowledge space, fitted once and reused by
every refresh in that space (docs/architecture.md, Knowledge snapshot)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offline.knowledge.build_plan import BuildPlan, RawVectors
from shared.errors import UserFacingError
from shared.knowledge.snapshot import REDUCER_FILE, KnowledgeSpace, read_reducer

Reducer = tuple[np.ndarray, np.ndarray]  # (mean [raw], components [dim, raw])


def fit_pca(x: np.ndarray, dim: int, max_rows: int = 50_000, seed: int = 0) -> Reducer:
    """(mean [raw], components [dim, raw]) of a PCA fitted on up to max_rows rows (float64 SVD)."""
    if dim > min(x.shape):
        raise UserFacingError(f"--reduce-dim {dim} exceeds what {x.shape[0]} vectors of dim {x.shape[1]} allow")
    rng = np.random.default_rng(seed)
    sample = x if len(x) <= max_rows else x[rng.choice(len(x), max_rows, replace=False)]
    mean = sample.mean(0, dtype=np.float64)
    _, _, vt = np.linalg.svd(sample.astype(np.float64) - mean, full_matrices=False)
    comps = vt[:dim]
    # Deterministic sign: the largest-magnitude coordinate of each component is positive.
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
    comps = comps * signs[:, None]
    return mean.astype(np.float32), comps.astype(np.float32)


def save_reducer(path: Path, mean: np.ndarray, comps: np.ndarray) -> str:
    from safetensors.numpy import save_file

    save_file({"mean": mean, "components": comps}, str(path))
    return reducer_sha(mean, comps)


def reducer_sha(mean: np.ndarray, comps: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mean, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(comps, dtype="<f4").tobytes())
    return h.hexdigest()


def apply_reducer(x: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    return ((x - mean) @ comps.T).astype(np.float32)


@dataclass(frozen=True)
class Reduction:
    """The knowledge space of the new version and the reducer (None: vectors are stored as the LLM gave them)."""

    space: KnowledgeSpace
    reducer: Reducer | None

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return apply_reducer(raw, *self.reducer) if self.reducer is not None else raw


def reduce_step(plan: BuildPlan, computed: RawVectors) -> Reduction:
    """Copies the parent's reducer (same space) or fits a new one on the serve user and item vectors (computed, and
    reused ones when they are the LLM's own), into the version folder; the space records its hash and dimension.
    The fit user vectors are left out of the fit (the space does not depend on --fit-share) and reduced with the
    same reducer when written."""
    config = plan.config
    reducer: Reducer | None = None
    dim = plan.raw_dim
    if config.reduce_dim is not None:
        path = plan.version_dir / REDUCER_FILE
        if plan.reuse_reducer:
            assert plan.parent is not None
            shutil.copyfile(plan.parent.path / REDUCER_FILE, path)
            reducer = read_reducer(path)
        else:
            reducer = fit_pca(_raw_serve_vectors(plan, computed), config.reduce_dim)
            save_reducer(path, *reducer)
        dim = config.reduce_dim
    red_sha = reducer_sha(*reducer) if reducer is not None else None
    space = KnowledgeSpace(raw_dim=plan.raw_dim, dim=dim, reducer_sha256=red_sha, **plan.space_key.to_dict())
    return Reduction(space, reducer)


def _raw_serve_vectors(plan: BuildPlan, computed: RawVectors) -> np.ndarray:
    """The user and item vectors a new reducer is fitted on, in id order: every row, computed or (from an
    unreduced parent) reused."""
    rows = []
    for level in ("user", "item"):
        work = plan.tables[level]
        for id_ in work.ids:
            if id_ in computed[level]:
                rows.append(computed[level][id_][1])
            elif plan.reduce_reused and id_ in work.reused:
                rows.append(work.reused[id_][1])
    return np.stack(rows)
