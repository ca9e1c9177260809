"""The plan step of a build: read the data, write the prompts' texts, find what the previous version lets us reuse,
and pick the version folder (a new one, or the unfinished one of the same inputs, to resume)
(docs/architecture.md, Knowledge snapshot)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from offline.data.fit_cutoff import fit_history
from offline.data.split import Split, make_split
from offline.knowledge import prompts as P
from offline.knowledge.backends.base import DtypeChoice, resolve_dtype
from offline.knowledge.build_config import AUTO, AUTO_MIN_VECTORS_PER_DIM, AUTO_REDUCE_DIM, KnowledgeConfig
from offline.knowledge.build_shards import BUILD_KEY_FILE, WORK
from shared.dataset.folder import Dataset, read_dataset
from shared.errors import UserFacingError
from shared.knowledge.levels import META_LEVELS
from shared.knowledge.snapshot import LATEST, MANIFEST, REDUCER_FILE, TABLES, USER_FIT, KnowledgeSnapshot

log = logging.getLogger(__name__)

# table (a level or USER_FIT) -> id -> (the LLM's answer, "" in encode mode; the raw pooled vector): what the
# phases computed.
RawVectors = dict[str, dict[str, tuple[str, np.ndarray]]]


@dataclass(frozen=True)
class SpaceKey:
    """The knowledge-space fields fixed before any vector exists (the reduce step adds dimensions and reducer)."""

    model: str
    template_sha256: str
    pooling: str
    mode: str
    max_length: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TableWork:
    """One table's rows: ids (sorted), texts, prompt hashes, and what the parent already has.

    table is a level, or USER_FIT: the user level's prompts made from the early train history only.
    """

    table: str
    ids: list[str]
    texts: list[str]
    hashes: list[str]
    generate: bool
    # id -> (response, the parent's stored vector: reduced in its space, or the LLM's own when it has no reducer)
    reused: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def pending(self) -> list[int]:
        return [i for i, id_ in enumerate(self.ids) if id_ not in self.reused]


@dataclass(frozen=True)
class BuildPlan:
    """Everything the later steps read: the settings (dtype and reduce dim resolved), the inputs' fingerprints, the
    rows to compute or reuse per table, and the version folder."""

    config: KnowledgeConfig
    dtype: DtypeChoice
    dataset_name: str
    dataset_fingerprint: str
    split_fingerprint: str
    model_path: Path
    raw_dim: int
    space_key: SpaceKey
    # The generation settings (empty in encode mode): a parent built with others cannot lend its vectors.
    generation: dict
    parent: KnowledgeSnapshot | None
    # Copy the parent's reducer instead of fitting one (same space, same --reduce-dim).
    reuse_reducer: bool
    # The reused vectors are the LLM's own (an unreduced parent) and go through this build's new reducer.
    reduce_reused: bool
    # Per table, in TABLES order (USER_FIT only when the build makes fit vectors).
    tables: dict[str, TableWork]
    version_dir: Path

    @property
    def root(self) -> Path:
        return self.version_dir.parent

    @property
    def work_dir(self) -> Path:
        return self.version_dir / WORK


def load_token_counter(model: str | None) -> tuple[P.TokenCounter, Path, str]:
    """The model's token counter alone (for prompt budgets): no LLM engine is started, and after the first build
    with this model not even transformers is imported (offline/knowledge/tokens.py)."""
    from offline.knowledge.models import resolve_model
    from offline.knowledge.tokens import load_token_counter as counter_for

    path, name = resolve_model(model)
    return counter_for(path), path, name


def plan_build(config: KnowledgeConfig) -> BuildPlan:
    """Fails on a malformed dataset before any model is loaded; loads only the tokenizer (prompt budgets)."""
    dataset = read_dataset(config.data)
    split = make_split(dataset, config.split)
    # The dtype is fixed here, once, for every engine of the build (Ray workers included).
    dtype = resolve_dtype(config.backend.dtype, config.backend.device)
    log.info("dtype %s: %s", dtype.dtype, dtype.reason)
    config = replace(config, backend=replace(config.backend, dtype=dtype.dtype))

    count_tokens, model_path, model_name = load_token_counter(config.backend.model)
    texts = _texts(dataset, split, config, count_tokens)
    raw_dim = _model_hidden_size(model_path)
    space_key = SpaceKey(
        model_name, P.template_sha256(config.prompts), config.pooling, config.mode, config.backend.max_length
    )
    generation = _generation_settings(config)
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    latest = _latest_in_space(root, space_key)
    n_vectors = len(texts["user"]) + len(texts["item"])
    reduce_dim, why = resolve_reduce_dim(config.reduce_dim, raw_dim, latest, n_vectors)
    if config.reduce_dim == AUTO:
        log.info("--reduce-dim auto: %s (%s)", reduce_dim or "none", why)
    config = replace(config, reduce_dim=reduce_dim)
    use = _usable_parent(latest, config, generation)
    parent = use.parent
    generated = (*META_LEVELS, USER_FIT) if config.mode == "generate" else ()
    tables = {table: _table_work(table, texts[table], table in generated, parent) for table in TABLES if table in texts}
    build_key = _sha(
        {
            "dataset": dataset.fingerprint(),
            "split": split.fingerprint(),
            "space": space_key.to_dict(),
            "prompts": config.prompts.to_dict(),
            "generation": generation,
            "backend": config.backend.backend,
            "dtype": config.backend.dtype,
            "reduce_dim": config.reduce_dim,
            "new_space": config.new_space,
            "parent": parent.version if parent else None,
            "shard_size": config.shard_size,
            # Only when there are fit vectors: the key of a --fit-share 0 build is what it was before them.
            **({"fit_share": config.fit_share} if config.builds_fit_vectors else {}),
        }
    )
    return BuildPlan(
        config=config,
        dtype=dtype,
        dataset_name=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        split_fingerprint=split.fingerprint(),
        model_path=model_path,
        raw_dim=raw_dim,
        space_key=space_key,
        generation=generation,
        parent=parent,
        reuse_reducer=use.reuse_reducer,
        reduce_reused=use.reduce_reused,
        tables=tables,
        version_dir=_version_dir(root, build_key),
    )


def _texts(
    dataset: Dataset, split: Split, config: KnowledgeConfig, count_tokens: P.TokenCounter
) -> dict[str, dict[str, str]]:
    """table -> id -> the text the LLM gets; the fit table's prompts use the same template on the early history."""
    texts = {
        "scenario": P.scenario_prompts(dataset),
        "user": P.user_prompts(dataset, split, config.prompts, count_tokens),
        "item": P.item_texts(dataset),
    }
    if config.builds_fit_vectors:
        early = fit_history(split, config.fit_share)
        texts[USER_FIT] = P.user_prompts(dataset, split, config.prompts, count_tokens, history=early)
    return texts


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_hidden_size(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "d_model", "n_embd"):
        if key in cfg:
            return int(cfg[key])
    raise UserFacingError(f"cannot find the hidden size in {path / 'config.json'}")


def _generation_settings(config: KnowledgeConfig) -> dict:
    if config.mode != "generate":
        return {}
    return {
        "max_new_tokens": config.backend.max_new_tokens,
        "chat_template": config.backend.chat_template,
        "greedy": True,
    }


def resolve_reduce_dim(
    requested: int | str | None, raw_dim: int, latest: KnowledgeSnapshot | None, n_vectors: int
) -> tuple[int | None, str]:
    """(the build's reduce dim, why): a number or None as given; AUTO keeps the latest version's space (same LLM and
    prompts) so that a refresh never changes it by itself, and otherwise reduces to AUTO_REDUCE_DIM when the LLM is
    wider and n_vectors (the serve users and items the PCA is fitted on) are enough for it."""
    if requested != AUTO:
        return requested, "as given"
    if latest is not None:
        dim = latest.space.dim if latest.space.reducer_sha256 is not None else None
        return dim, f"the space of version {latest.version}"
    if raw_dim <= AUTO_REDUCE_DIM:
        return None, f"the LLM's width {raw_dim} is at most {AUTO_REDUCE_DIM}"
    if n_vectors < AUTO_MIN_VECTORS_PER_DIM * AUTO_REDUCE_DIM:
        return None, (
            f"{n_vectors} user and item vectors are too few to fit a {AUTO_REDUCE_DIM}-d PCA on "
            f"(at least {AUTO_MIN_VECTORS_PER_DIM * AUTO_REDUCE_DIM})"
        )
    return AUTO_REDUCE_DIM, f"a new space: the LLM's width {raw_dim} reduced, fitted on {n_vectors} vectors"


@dataclass(frozen=True)
class ParentUse:
    """What a build takes from the previous version: its vectors (None: nothing) and whether they are raw."""

    parent: KnowledgeSnapshot | None = None
    # Copy the parent's reducer instead of fitting one (same space, same --reduce-dim).
    reuse_reducer: bool = False
    # The parent stores the LLM's own vectors and this build fits a reducer: reused vectors go through it too.
    reduce_reused: bool = False


def _usable_parent(latest: KnowledgeSnapshot | None, config: KnowledgeConfig, generation: dict) -> ParentUse:
    """The previous version whose vectors this build may reuse, and how."""
    if latest is None or not config.incremental:
        return ParentUse()
    if latest.manifest.extra.get("generation") != generation:
        log.info("previous version %s used other generation settings: full build", latest.version)
        return ParentUse()
    raw_parent = latest.space.reducer_sha256 is None
    if config.reduce_dim is None:
        if raw_parent:
            return ParentUse(latest)
        log.info("previous version %s is reduced and this build is not: full build", latest.version)
        return ParentUse()
    if raw_parent:
        log.info("previous version %s holds the LLM's own vectors: reused through the new reducer", latest.version)
        return ParentUse(latest, reduce_reused=True)
    if not config.new_space and latest.space.dim == config.reduce_dim and (latest.path / REDUCER_FILE).exists():
        return ParentUse(latest, reuse_reducer=True)
    log.info("previous version %s has another reducer: full build", latest.version)
    return ParentUse()


def _latest_in_space(root: Path, space_key: SpaceKey) -> KnowledgeSnapshot | None:
    """The root's latest version when it was built with the same LLM, prompts, pooling, mode and max length."""
    if not (root / LATEST).exists():
        return None
    try:
        latest = KnowledgeSnapshot(root)
    except UserFacingError:
        return None
    s = latest.space
    if (s.model, s.template_sha256, s.pooling, s.mode, s.max_length) != (
        space_key.model,
        space_key.template_sha256,
        space_key.pooling,
        space_key.mode,
        space_key.max_length,
    ):
        log.info("previous version %s is in another knowledge space: full build", latest.version)
        return None
    return latest


def _table_work(table: str, texts: dict[str, str], generate: bool, parent: KnowledgeSnapshot | None) -> TableWork:
    """The table's rows in id order; rows whose prompt hash equals the parent's keep its answer and vector (a parent
    without fit vectors lends none to the fit table)."""
    ids = sorted(texts)
    work = TableWork(table, ids, [texts[i] for i in ids], [P.prompt_sha256(texts[i]) for i in ids], generate)
    if parent is not None and (table != USER_FIT or parent.has_fit_vectors):
        ptable = parent.table(table)
        for j, p in enumerate(ptable.positions(ids)):
            if p >= 0 and ptable.prompt_sha256[p] == work.hashes[j]:
                work.reused[ids[j]] = (ptable.responses[p], ptable.embeddings[p])
    return work


def _version_dir(root: Path, build_key: str) -> Path:
    """The unfinished version of the same inputs (to resume), else a new one with its build key written."""
    vdir = _find_unfinished(root, build_key)
    if vdir is not None:
        log.info("resuming unfinished build %s", vdir.name)
        return vdir
    vdir = root / new_version(root, build_key)
    (vdir / WORK).mkdir(parents=True)
    (vdir / WORK / BUILD_KEY_FILE).write_text(json.dumps({"key": build_key}) + "\n")
    return vdir


def new_version(root: Path, key: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    version = f"{stamp}-{key[:8]}"
    n = 1
    while (root / version).exists():
        n += 1
        version = f"{stamp}-{key[:8]}-{n}"
    return version


def _find_unfinished(root: Path, key: str) -> Path | None:
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir()):
        f = d / WORK / BUILD_KEY_FILE
        if d.is_dir() and not (d / MANIFEST).exists() and f.exists():
            try:
                if json.loads(f.read_text()).get("key") == key:
                    return d
            except (OSError, ValueError):
                continue
    return None
