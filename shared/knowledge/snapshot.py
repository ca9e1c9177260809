"""Knowledge snapshots on disk: the source of truth that training reads and the publisher copies to Redis.

Layout (docs/architecture.md, Knowledge snapshot):
  <root>/<version>/manifest.json      written last: a version without it does not exist for readers
  <root>/<version>/scenarios.parquet  id, prompt_sha256, response, embedding (fixed-size list of float32)
  <root>/<version>/users.parquet      the "serve" user vectors: prompts from the whole train history
  <root>/<version>/users_fit.parquet  optional, training only (never published): the "fit" user vectors, prompts
                                      from each user's early train history (offline/data/fit_cutoff.py)
  <root>/<version>/items.parquet      response is empty (items are embedded in encode mode)
  <root>/<version>/defaults.parquet   id "user": the cold-start user vector
  <root>/LATEST                       name of the newest finished version (written after its manifest)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.errors import UserFacingError
from shared.knowledge.levels import level_of, table_name

MANIFEST = "manifest.json"
LATEST = "LATEST"
DEFAULTS = "defaults"
DEFAULT_USER_ID = "user"
# The PCA of a reduced knowledge space: safetensors with "mean" [raw_dim] and "components" [dim, raw_dim]; stored
# = (llm_vector - mean) @ components.T.
REDUCER_FILE = "reducer.safetensors"
# The table of "fit" user vectors (the user level's prompts from the early train history only): a table beside the
# levels, not a level of its own; KnowledgeSnapshot.table(USER_FIT) reads it.
USER_FIT = "user_fit"
# Every vector table a build writes, in the order it computes them.
TABLES = ("scenario", "user", USER_FIT, "item")
_STORED_FIT = "users_fit"


def stored_name(table: str) -> str:
    """The file stem of a table: a level's plural (levels.table_name), "users_fit", or "defaults"."""
    if table == USER_FIT:
        return _STORED_FIT
    return DEFAULTS if table == DEFAULTS else table_name(table)


# The longest token sequence the LLM saw; every snapshot written before the field existed used this value.
LEGACY_MAX_LENGTH = 2048
# Space fields added after the first snapshots, with the value those snapshots had: at that value a field is left
# out of the id, so that existing snapshots and the models trained on them keep their space id.
ADDED_SPACE_FIELDS = {"max_length": LEGACY_MAX_LENGTH}
_UNSET = object()


@dataclass(frozen=True)
class KnowledgeSpace:
    """What makes two vectors comparable: the model, the prompt templates, pooling, mode, reducer and max_length
    (texts longer than it are cut, which changes their vectors).

    Not in it: the backend (hf and vllm vectors agree, tests/test_knowledge_vllm.py) and the dtype (bf16 and fp32
    vectors agree to cosine >= 0.999, tests/test_knowledge_dtype.py); both are recorded in the manifest.
    A model trained on one space must not be fed vectors from another; `id` is what artifacts record.
    """

    model: str
    template_sha256: str
    pooling: str
    mode: str
    raw_dim: int
    dim: int
    reducer_sha256: str | None = None
    max_length: int = LEGACY_MAX_LENGTH

    @property
    def id(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if ADDED_SPACE_FIELDS.get(k, _UNSET) != v}
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, data: dict) -> KnowledgeSpace:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        space = cls(**fields)
        if "id" in data and data["id"] != space.id:
            raise UserFacingError(f"knowledge space id {data['id']} does not match its fields ({space.id})")
        return space


# Manifest fields keyed by level: singular in memory, the tables' names on disk.
PER_LEVEL_FIELDS = ("counts", "computed", "reused")


@dataclass(frozen=True)
class TableCounts:
    """One table's rows in a version: all of them, computed by the LLM in this build, reused from the parent."""

    count: int
    computed: int
    reused: int


@dataclass
class Manifest:
    version: str
    created_at: str
    space: KnowledgeSpace
    dataset_fingerprint: str
    split_fingerprint: str
    counts: dict[str, int]
    backend: str = ""
    parent_version: str | None = None
    # Per level: how many vectors were computed by the LLM in this build vs. reused from the parent.
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # The dtype the LLM ran in (after --dtype auto); "" in manifests older than the field.
    dtype: str = ""
    # Why that dtype: the requested one, the device and the CPU (model name, native bf16 instruction sets).
    hardware: dict = field(default_factory=dict)
    # Texts cut to space.max_length tokens, per "<table>_<generate|embed>" (a level or "user_fit"), among those
    # computed in this build.
    truncated: dict[str, int] = field(default_factory=dict)
    # The fit user table: the share of each user's train history its prompts show (None: no fit vectors, also in
    # manifests older than the field) and its counts. Kept out of the per-level fields, which every reader (also
    # a ranker of an older release reading the published manifest) takes for the three levels.
    fit_share: float | None = None
    fit_counts: TableCounts | None = None

    def __post_init__(self) -> None:
        for name in PER_LEVEL_FIELDS:  # either spelling in, the level's name in memory
            setattr(self, name, {level_of(key): n for key, n in getattr(self, name).items()})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["space"] = self.space.to_dict()
        for name in PER_LEVEL_FIELDS:  # stored under the tables' names (see shared/knowledge/levels.py)
            data[name] = {table_name(level): n for level, n in data[name].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["space"] = KnowledgeSpace.from_dict(data["space"])
        if data.get("fit_counts") is not None:
            data["fit_counts"] = TableCounts(**data["fit_counts"])
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class KnowledgeTable:
    """One level's vectors. ids are unique; embeddings is float32 [n, dim]."""

    ids: list[str]
    embeddings: np.ndarray
    prompt_sha256: list[str]
    responses: list[str]
    _index: pd.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.ids):
            raise ValueError(f"embeddings shape {self.embeddings.shape} does not match {len(self.ids)} ids")
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            raise ValueError("knowledge table ids are not unique")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where absent."""
        return self._index.get_indexer(pd.Index(list(ids), dtype=object))

    def lookup(self, ids: Sequence[str], default: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ids (default or zeros where absent) and the found mask."""
        pos = self.positions(ids)
        found = pos >= 0
        out = np.zeros((len(pos), self.dim), dtype=np.float32)
        out[found] = self.embeddings[pos[found]]
        if default is not None:
            out[~found] = default
        return out, found

    def response_of(self, id_: str) -> str | None:
        pos = self.positions([id_])[0]
        return None if pos < 0 else self.responses[pos]


def table_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt_sha256", pa.string()),
            ("response", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def table_to_arrow(table: KnowledgeTable) -> pa.Table:
    dim = table.dim
    flat = pa.array(table.embeddings.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays(
        [
            pa.array(table.ids, type=pa.string()),
            pa.array(table.prompt_sha256, type=pa.string()),
            pa.array(table.responses, type=pa.string()),
            emb,
        ],
        schema=table_schema(dim),
    )


def write_table(path: str | os.PathLike, table: KnowledgeTable) -> None:
    """Writes one level's Parquet file via a temp name, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table_to_arrow(table), tmp)
    os.replace(tmp, path)


def read_table(path: str | os.PathLike) -> KnowledgeTable:
    arrow = pq.read_table(path)
    emb_col = arrow.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(emb_col.type):
        dim = emb_col.type.list_size
    else:  # written by another tool: accepted only when every row has the same length
        lengths = pc.list_value_length(emb_col).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            row = int(bad[0])
            raise UserFacingError(
                f"{path}: the embedding of id {arrow.column('id')[row].as_py()!r} (row {row + 1}) has "
                f"{int(lengths[row])} values, the first row's has {dim} ({len(bad)} rows differ)"
            )
    flat = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return KnowledgeTable(
        ids=arrow.column("id").to_pylist(),
        embeddings=flat.reshape(-1, dim),
        prompt_sha256=arrow.column("prompt_sha256").to_pylist(),
        responses=arrow.column("response").to_pylist(),
    )


def write_manifest(version_dir: str | os.PathLike, manifest: Manifest) -> None:
    """The last write of a build: makes the version visible, then points LATEST at it."""
    version_dir = Path(version_dir)
    tmp = version_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, version_dir / MANIFEST)
    latest = version_dir.parent / LATEST
    tmp_latest = version_dir.parent / (LATEST + ".tmp")
    tmp_latest.write_text(manifest.version + "\n")
    os.replace(tmp_latest, latest)


def resolve_snapshot_dir(path: str | os.PathLike) -> Path:
    """Accepts a version folder or a knowledge root (then its LATEST version)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / LATEST).exists():
        version = (path / LATEST).read_text().strip()
        if (path / version / MANIFEST).exists():
            return path / version
    if path.is_dir() and any(path.iterdir()):
        raise UserFacingError(
            f"{path} holds no finished knowledge snapshot (no {MANIFEST}); an interrupted build resumes when the "
            "same `llm4msr knowledge build` command is run again"
        )
    raise UserFacingError(f"knowledge snapshot not found: {path}")


class KnowledgeSnapshot:
    """A finished snapshot version; tables are loaded on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_snapshot_dir(path)
        self.manifest = Manifest.from_dict(json.loads((self.path / MANIFEST).read_text()))
        self._tables: dict[str, KnowledgeTable] = {}

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def space(self) -> KnowledgeSpace:
        return self.manifest.space

    @property
    def has_fit_vectors(self) -> bool:
        """Whether the build wrote fit user vectors (table USER_FIT), which the leak-free training protocol needs."""
        return self.manifest.fit_share is not None

    def table(self, table: str) -> KnowledgeTable:
        """A level's table ("scenario", "user", "item"), the fit user table (USER_FIT) or the defaults (DEFAULTS)."""
        if table not in (*TABLES, DEFAULTS):
            raise ValueError(f"unknown knowledge table {table!r}; expected one of {(*TABLES, DEFAULTS)}")
        if table == USER_FIT and not self.has_fit_vectors:
            raise UserFacingError(
                f"snapshot {self.path} has no fit user vectors (built with --fit-share 0 or before they existed); "
                "rebuild it with `llm4msr knowledge build --fit-share 0.7`"
            )
        if table not in self._tables:
            name = stored_name(table)
            file = self.path / f"{name}.parquet"
            if not file.exists():
                raise UserFacingError(f"snapshot {self.path} has no {name}.parquet")
            self._tables[table] = read_table(file)
        return self._tables[table]

    def scenarios(self) -> KnowledgeTable:
        return self.table("scenario")

    def users(self) -> KnowledgeTable:
        return self.table("user")

    def items(self) -> KnowledgeTable:
        return self.table("item")

    def fit_users(self) -> KnowledgeTable:
        return self.table(USER_FIT)

    def reducer(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean [raw_dim], components [dim, raw_dim]) of the space's PCA, or None when vectors are the LLM's own."""
        if self.space.reducer_sha256 is None:
            return None
        file = self.path / REDUCER_FILE
        if not file.exists():
            raise UserFacingError(f"snapshot {self.path} is in a reduced knowledge space but has no {REDUCER_FILE}")
        return read_reducer(file)

    def default_user(self) -> np.ndarray:
        defaults = self.table(DEFAULTS)
        vec, found = defaults.lookup([DEFAULT_USER_ID])
        if not found[0]:
            raise UserFacingError(f"snapshot {self.path} has no default user vector")
        return vec[0]


def read_reducer(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components) from a REDUCER_FILE."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return tensors["mean"], tensors["components"]
