"""Helpers for model tests (and for other areas' tests that need a trained artifact).

- `write_planted_snapshot`: a knowledge snapshot in the real format (shared.knowledge.snapshot) whose vectors carry
  known signal: item vector = mean of hashed word vectors of the title (content), user vector = mean of the user's
  TRAIN positive items' vectors, scenario vector = hashed words of the description, and (unless with_fit=False) the
  fit user table a build writes: the mean over the user's EARLY train positives only (fit_cutoff.fit_history). No
  LLM needed.
- `add_fit_table`: writes a fit user table into a finished snapshot version (what `--fit-share` builds).
- `latent_task`: an in-memory dataset where the click depends on a hidden user x item affinity and on the scenario;
  `latent_snapshot` writes the hidden user/item factors as "knowledge", so the answer is known.
- `train_tiny_artifact`: trains a small model on a dataset folder + snapshot and writes an artifact (seconds).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from offline.data.fit_cutoff import DEFAULT_FIT_SHARE, fit_history
from offline.data.split import Split, SplitConfig, make_split
from shared.dataset.folder import SEQ, Dataset
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    KnowledgeSnapshot,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    TableCounts,
    write_manifest,
    write_table,
)


@functools.lru_cache(maxsize=200_000)
def _word_vec(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def _text_vec(text: str, dim: int) -> np.ndarray:
    words = [w for w in str(text).lower().split() if w.isalpha()]
    if not words:
        return np.zeros(dim, dtype=np.float32)
    return np.mean([_word_vec(w, dim) for w in words], axis=0).astype(np.float32)


def _table(ids, vecs: np.ndarray) -> KnowledgeTable:
    ids = [str(i) for i in ids]
    return KnowledgeTable(ids, np.asarray(vecs, np.float32), ["x" * 64] * len(ids), [""] * len(ids))


def write_snapshot(
    root: str | Path,
    split: Split,
    scenarios: dict[str, np.ndarray],
    users: dict[str, np.ndarray],
    items: dict[str, np.ndarray],
    model: str = "planted",
    version: str = "v1",
    split_fingerprint: str | None = None,
) -> Path:
    """Writes a finished snapshot version (manifest last) and returns the version folder."""
    dim = len(next(iter(scenarios.values())))
    version_dir = Path(root) / version
    version_dir.mkdir(parents=True, exist_ok=True)
    write_table(version_dir / "scenarios.parquet", _table(scenarios, np.stack(list(scenarios.values()))))
    write_table(version_dir / "users.parquet", _table(users, np.stack(list(users.values()))))
    write_table(version_dir / "items.parquet", _table(items, np.stack(list(items.values()))))
    default = np.mean(np.stack(list(users.values())), axis=0, keepdims=True)
    write_table(version_dir / "defaults.parquet", _table([DEFAULT_USER_ID], default))
    space = KnowledgeSpace(model=model, template_sha256="t" * 64, pooling="mean", mode="encode", raw_dim=dim, dim=dim)
    manifest = Manifest(
        version=version,
        created_at="2024-01-01T00:00:00+00:00",
        space=space,
        dataset_fingerprint=split.dataset_fingerprint,
        split_fingerprint=split_fingerprint or split.fingerprint(),
        counts={"scenarios": len(scenarios), "users": len(users), "items": len(items)},
        backend="test",
    )
    write_manifest(version_dir, manifest)
    return version_dir


def add_fit_table(version_dir: Path, fit_users: dict[str, np.ndarray], share: float = DEFAULT_FIT_SHARE) -> Path:
    """Writes the fit user table into a finished snapshot version and records it in the manifest (manifest last,
    as the build does)."""
    ids = list(fit_users)
    n = len(ids)
    vecs = np.stack([fit_users[i] for i in ids]).astype(np.float32)
    write_table(version_dir / "users_fit.parquet", KnowledgeTable(ids, vecs, ["f" * 64] * n, [""] * n))
    manifest = KnowledgeSnapshot(version_dir).manifest
    manifest.fit_share, manifest.fit_counts = share, TableCounts(count=n, computed=n, reused=0)
    write_manifest(version_dir, manifest)
    return version_dir


def _mean_item_vectors(history: pd.DataFrame, items: dict[str, np.ndarray], users, dim: int) -> dict[str, np.ndarray]:
    """Per user, the mean vector of the items in its history rows (zeros for a user without any)."""
    out = {str(u): np.zeros(dim, np.float32) for u in users}
    for user, group in history.groupby("user_id"):
        vecs = [items[i] for i in group["item_id"].astype(str) if i in items]
        if vecs:
            out[str(user)] = np.mean(vecs, axis=0).astype(np.float32)
    return out


def write_planted_snapshot(
    dataset: Dataset,
    split: Split,
    root: str | Path,
    dim: int = 16,
    model: str = "planted",
    version: str = "v1",
    with_fit: bool = True,
    fit_share: float = DEFAULT_FIT_SHARE,
) -> Path:
    """Content knowledge for any dataset folder (see module doc)."""
    items = {
        i: _text_vec(f"{t} {c}", dim)
        for i, t, c in zip(
            dataset.items["item_id"],
            dataset.items["title"],
            dataset.items["category"] if "category" in dataset.items.columns else [""] * len(dataset.items),
        )
    }
    train_users = pd.unique(split.train["user_id"])
    users = _mean_item_vectors(split.train_positives(), items, train_users, dim)
    scenarios = {s: _text_vec(d, dim) for s, d in zip(dataset.scenarios["scenario"], dataset.scenarios["description"])}
    version_dir = write_snapshot(root, split, scenarios, users, items, model=model, version=version)
    if with_fit:
        add_fit_table(
            version_dir, _mean_item_vectors(fit_history(split, fit_share), items, train_users, dim), fit_share
        )
    return version_dir


def latent_task(
    users: int = 240,
    items: int = 60,
    rows_per_user: int = 24,
    dim: int = 4,
    seed: int = 0,
    scenario_flip: bool = False,
    affinity: float = 2.5,
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Two scenarios. Click logit = affinity * <u, v> / sqrt(dim) (+ an item effect whose sign flips between
    scenarios when scenario_flip). Returns the dataset and the hidden user and item factors."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(users, dim))
    v = rng.normal(size=(items, dim))
    effect = rng.normal(size=items) * 2.0
    scen_names = ["alpha", "beta"]
    item_ids = [f"i{j}" for j in range(items)]
    rows = []
    for a in range(users):
        for t in range(rows_per_user):
            j = int(rng.integers(items))
            s = int(rng.integers(2))
            logit = affinity * float(u[a] @ v[j]) / np.sqrt(dim)
            if scenario_flip:
                logit = 0.3 * logit + effect[j] * (1 if s == 0 else -1)
            rows.append((f"u{a}", item_ids[j], scen_names[s], float(rng.random() < 1 / (1 + np.exp(-logit))), t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario", "label", "timestamp"])
    inter["label"] = inter["label"].astype(np.float32)
    inter["timestamp"] = inter["timestamp"].astype(float)
    inter[SEQ] = np.arange(len(inter), dtype=np.int64)
    dataset = Dataset(
        scenarios=pd.DataFrame({"scenario": scen_names, "description": ["first store", "second store"]}),
        items=pd.DataFrame({"item_id": item_ids, "title": item_ids, "category": [f"c{j % 5}" for j in range(items)]}),
        interactions=inter,
        name="latent",
    )
    return dataset, u.astype(np.float32), v.astype(np.float32)


def latent_snapshot(
    dataset: Dataset,
    split: Split,
    u: np.ndarray,
    v: np.ndarray,
    root: str | Path,
    dim: int = 12,
    noise: float = 0.1,
    model: str = "planted",
    seed: int = 1,
    with_fit: bool = True,
) -> Path:
    """The hidden factors, padded with noise dimensions and mixed by a random rotation, as knowledge vectors."""
    rng = np.random.default_rng(seed)
    mix = np.linalg.qr(rng.normal(size=(dim, dim)))[0]

    def embed(x: np.ndarray) -> np.ndarray:
        pad = rng.normal(scale=noise, size=(len(x), dim - x.shape[1]))
        return (np.hstack([x + rng.normal(scale=noise, size=x.shape), pad]) @ mix + 3.0).astype(np.float32)

    users = dict(zip([f"u{a}" for a in range(len(u))], embed(u)))
    items = dict(zip([f"i{j}" for j in range(len(v))], embed(v)))
    scen = dict(zip(dataset.scenario_names, rng.normal(size=(len(dataset.scenario_names), dim)).astype(np.float32)))
    version_dir = write_snapshot(root, split, scen, users, items, model=model)
    # The hidden factors do not depend on the history, so fit vectors equal the serve ones (nothing can leak).
    return add_fit_table(version_dir, users) if with_fit else version_dir


def tiny_train_config(**overrides):
    from offline.training.trainer import TrainConfig

    # embed_init_std 0.05: the init the toy tasks' margins and epoch budgets were set for. At the default 1e-4 the
    # ID embeddings start near zero and take more epochs than these tiny runs have to carry signal (the default is
    # chosen on real data; the CLI tests train with it). knowledge_lr_scale 1: lr is already 3x the default here,
    # so the knowledge pathway learns at 3e-3, its rate in default training (1e-3 x 3); at 3 x 3e-3 the ungated STAR
    # fell to the random control's AUC on the affinity task.
    base = dict(
        epochs=4,
        patience=1,
        batch_size=256,
        lr=3e-3,
        knowledge_lr_scale=1.0,
        threads=1,
        progress=False,
        embed_dim=8,
        embed_init_std=0.05,
    )
    return TrainConfig.from_flat({**base, **overrides})


def train_tiny_artifact(
    data_dir: str | Path,
    snapshot_dir: str | Path | None,
    out_dir: str | Path,
    backbone: str = "star",
    levels: tuple[str, ...] = ("scenario", "user"),
    knowledge_source: str = "llm",
    llm4msr: bool = True,
    split_config: SplitConfig | None = None,
    **train_overrides,
) -> Path:
    """Trains a small model on a dataset folder (+ snapshot built on the same split) and writes an artifact.

    With `snapshot_dir=None` and the llm source, a planted snapshot is written next to out_dir first.
    """
    from offline.training.trainer import train
    from shared.artifact import save_artifact
    from shared.dataset.folder import read_dataset
    from shared.knowledge.snapshot import KnowledgeSnapshot

    dataset = read_dataset(data_dir)
    split = make_split(dataset, split_config or SplitConfig())
    if snapshot_dir is None and llm4msr and knowledge_source == "llm":
        snapshot_dir = write_planted_snapshot(dataset, split, Path(out_dir).parent / (Path(out_dir).name + "-kn"))
    snapshot = KnowledgeSnapshot(snapshot_dir) if snapshot_dir else None
    cfg = tiny_train_config(
        backbone=backbone, levels=list(levels), knowledge_source=knowledge_source, llm4msr=llm4msr, **train_overrides
    )
    result = train(dataset, split, snapshot, cfg)
    return save_artifact(out_dir, result.model, result.encoder, result.artifact_fields(split), overwrite=True)
