"""The knowledge build: prompts -> (generate) -> embed -> (reduce) -> snapshot (DESIGN section 5).

Resumable: every finished shard of work is a Parquet file under `<version>/_work/`; a rerun of the same build
finds the unfinished version (same inputs -> same build key), skips finished shards and computes the rest with the
same batches, so the result equals an uninterrupted run. The manifest is written last.

Incremental: a row whose prompt hash equals the one in the previous version (same knowledge space and generation
settings) keeps its vector and answer without an LLM call.

Texts longer than the backend's max_length are cut to it (the same way by both backends); the build counts them per
level and phase, warns once with the total, and records the counts in the manifest and the summary line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from offline.data.split import SplitConfig, make_split
from offline.knowledge import prompts as P
from offline.knowledge.backends.base import (
    MODES,
    POOLINGS,
    Backend,
    BackendConfig,
    encoded_lengths,
    input_lengths,
    resolve_dtype,
)
from shared.dataset.folder import read_dataset
from shared.errors import UserFacingError
from shared.knowledge.levels import LEVELS, META_LEVELS, table_name
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    DEFAULTS,
    LATEST,
    MANIFEST,
    KnowledgeSnapshot,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)

log = logging.getLogger(__name__)

WORK = "_work"
BUILD_KEY_FILE = "build.json"
REDUCER_FILE = "reducer.safetensors"
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class KnowledgeConfig:
    """Everything a build depends on; the CLI and the refresh job fill it."""

    data: str
    out: str
    backend: BackendConfig = field(default_factory=BackendConfig)
    mode: str = "encode"
    pooling: str = "mean"
    engine: str = "local"
    ray_workers: int = 2
    ray_address: str | None = None
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 0.0
    split: SplitConfig = field(default_factory=SplitConfig)
    prompts: P.PromptConfig = field(default_factory=P.PromptConfig)
    # PCA to this many dimensions; the fitted reducer defines the knowledge space and is reused by refreshes.
    reduce_dim: int | None = None
    # Fit a new reducer even if the previous version has one (a new space: models must be retrained).
    new_space: bool = False
    # Reuse vectors of unchanged prompts from the previous version in --out.
    incremental: bool = True
    shard_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserFacingError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        if self.engine not in ENGINES:
            raise UserFacingError(f"unknown engine {self.engine!r}; expected one of {ENGINES}")
        if self.reduce_dim is not None and self.reduce_dim < 1:
            raise UserFacingError("--reduce-dim must be positive")
        if self.shard_size < 1:
            raise UserFacingError("shard size must be positive")
        if self.backend.max_length < 1:
            raise UserFacingError(f"--max-length must be positive, got {self.backend.max_length}")


# ----------------------------------------------------------------------------------------------- helpers


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def load_token_counter(model: str | None) -> tuple[P.TokenCounter, Path, str]:
    """The model's token counter alone (for prompt budgets): no LLM engine is started, and after the first build
    with this model not even transformers is imported (offline/knowledge/tokens.py)."""
    from offline.knowledge.models import resolve_model
    from offline.knowledge.tokens import load_token_counter as counter_for

    path, name = resolve_model(model)
    return counter_for(path), path, name


def _model_hidden_size(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "d_model", "n_embd"):
        if key in cfg:
            return int(cfg[key])
    raise UserFacingError(f"cannot find the hidden size in {path / 'config.json'}")


@dataclass
class LevelWork:
    """One level's rows: ids (sorted), texts, prompt hashes, and what the parent already has."""

    level: str
    ids: list[str]
    texts: list[str]
    hashes: list[str]
    generate: bool
    reused: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # id -> (response, final vector)

    def pending(self) -> list[int]:
        return [i for i, id_ in enumerate(self.ids) if id_ not in self.reused]


class Executor:
    """Runs backend calls over shards: in-process, or over Ray actors (ray_engine.RayExecutor)."""

    def __init__(self, backend_config: BackendConfig, backend: Backend | None = None):
        """backend: an engine already started (the bench times the build's path on one model); else one is made."""
        from offline.knowledge.backends import make_backend

        self.backend = backend if backend is not None else make_backend(backend_config)

    def map(self, op: str, shards: list[list[str]], pooling: str, progress=None):
        """Yields (shard index, result) as shards finish; result is list[str] (generate) or ndarray (embed).

        progress(n) is called as texts finish (per batch here, per shard on Ray).
        """
        for k, texts in enumerate(shards):
            if op == "generate":
                yield k, self.backend.generate(texts, progress=progress)
            else:
                yield k, self.backend.embed(texts, pooling, progress=progress)

    def end_generation(self) -> None:
        self.backend.end_generation()

    def close(self) -> None:
        self.backend.close()


def _shard_path(work: Path, level: str, phase: str, k: int) -> Path:
    return work / f"{table_name(level)}-{phase}-{k:05d}.parquet"


def _write_shard(path: Path, ids: list[str], responses: list[str], emb: np.ndarray | None) -> None:
    cols = {"id": pa.array(ids, type=pa.string()), "response": pa.array(responses, type=pa.string())}
    if emb is not None:
        dim = emb.shape[1]
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32()), dim
        )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def _read_shard(path: Path) -> tuple[list[str], list[str], np.ndarray | None]:
    t = pq.read_table(path)
    emb = None
    if "embedding" in t.column_names:
        col = t.column("embedding").combine_chunks()
        emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(t), col.type.list_size)
    return t.column("id").to_pylist(), t.column("response").to_pylist(), emb


# ----------------------------------------------------------------------------------------------- reducer


def fit_pca(x: np.ndarray, dim: int, max_rows: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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


def load_reducer(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    return t["mean"], t["components"]


def reducer_sha(mean: np.ndarray, comps: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mean, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(comps, dtype="<f4").tobytes())
    return h.hexdigest()


def apply_reducer(x: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    return ((x - mean) @ comps.T).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the build


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    seconds: float

    def summary(self) -> str:
        m = self.manifest
        parts = [
            f"{table_name(lvl)} {m.counts.get(lvl, 0)} ({m.computed.get(lvl, 0)} computed, {m.reused.get(lvl, 0)} reused)"
            for lvl in LEVELS
        ]
        users = m.computed.get("user", 0)
        rate = users / self.seconds if self.seconds > 0 else 0.0
        return (
            f"knowledge {m.version}: " + ", ".join(parts) + f"; dim {m.space.dim}, space {m.space.id}, "
            f"{m.backend} {m.dtype}, {sum(m.truncated.values())} texts cut to {m.space.max_length} tokens, "
            f"{self.seconds:.1f} s ({rate:.2f} computed users/s) -> {self.path}"
        )


def _find_parent(root: Path, space_base: dict, gen_settings: dict) -> KnowledgeSnapshot | None:
    if not (root / LATEST).exists():
        return None
    try:
        parent = KnowledgeSnapshot(root)
    except UserFacingError:
        return None
    s = parent.space
    same = (s.model, s.template_sha256, s.pooling, s.mode, s.max_length) == (
        space_base["model"],
        space_base["template_sha256"],
        space_base["pooling"],
        space_base["mode"],
        space_base["max_length"],
    )
    if not same:
        log.info("previous version %s is in another knowledge space: full build", parent.version)
        return None
    if parent.manifest.extra.get("generation") != gen_settings:
        log.info("previous version %s used other generation settings: full build", parent.version)
        return None
    return parent


def _new_version(root: Path, key: str) -> str:
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


def plan_shards(pending: list[int], lengths: list[int], shard_size: int) -> list[list[int]]:
    """Shards of row indices in length order: deterministic, so a resumed build recomputes identical batches."""
    order = sorted(pending, key=lambda i: (lengths[i], i))
    return [order[s : s + shard_size] for s in range(0, len(order), shard_size)]


def build_knowledge(
    config: KnowledgeConfig,
    executor_factory: Callable[[], Executor] | None = None,
    on_shard: Callable[[str, str, int], None] | None = None,
) -> Path:
    """Builds (or resumes) one snapshot version under config.out; returns the version folder."""
    return run_build(config, executor_factory, on_shard).path


def run_build(
    config: KnowledgeConfig,
    executor_factory: Callable[[], Executor] | None = None,
    on_shard: Callable[[str, str, int], None] | None = None,
) -> BuildResult:
    t0 = time.perf_counter()
    # 1. Data first: a malformed dataset fails here, before any model is loaded or called.
    dataset = read_dataset(config.data)
    split = make_split(dataset, config.split)
    # The dtype is fixed here, once, for every engine of the build (Ray workers included).
    dtype = resolve_dtype(config.backend.dtype, config.backend.device)
    log.info("dtype %s: %s", dtype.dtype, dtype.reason)
    config = replace(config, backend=replace(config.backend, dtype=dtype.dtype))

    # 2. Prompts (the tokenizer alone is loaded to enforce the token budget).
    count_tokens, model_path, model_name = load_token_counter(config.backend.model)
    scen_prompts = P.scenario_prompts(dataset)
    user_prompts = P.user_prompts(dataset, split, config.prompts, count_tokens)
    item_texts = P.item_texts(dataset)
    raw_dim = _model_hidden_size(model_path)
    template_sha = P.template_sha256(config.prompts)
    gen_settings = (
        {
            "max_new_tokens": config.backend.max_new_tokens,
            "chat_template": config.backend.chat_template,
            "greedy": True,
        }
        if config.mode == "generate"
        else {}
    )
    space_base = {
        "model": model_name,
        "template_sha256": template_sha,
        "pooling": config.pooling,
        "mode": config.mode,
        "max_length": config.backend.max_length,
    }

    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    parent = _find_parent(root, space_base, gen_settings) if config.incremental else None

    # The reducer: reuse the parent's (same space) unless a new one is asked for.
    reuse_reducer = (
        parent is not None
        and config.reduce_dim is not None
        and not config.new_space
        and parent.space.reducer_sha256 is not None
        and parent.space.dim == config.reduce_dim
        and (parent.path / REDUCER_FILE).exists()
    )
    vectors_reusable = parent is not None and (
        (config.reduce_dim is None and parent.space.reducer_sha256 is None) or reuse_reducer
    )
    if parent is not None and not vectors_reusable:
        log.info("previous version %s has another reducer: full build", parent.version)
        parent = None

    levels: dict[str, LevelWork] = {}
    for level, texts, gen in (
        ("scenario", scen_prompts, config.mode == "generate"),
        ("user", user_prompts, config.mode == "generate"),
        ("item", item_texts, False),
    ):
        ids = sorted(texts)
        work = LevelWork(level, ids, [texts[i] for i in ids], [P.prompt_sha256(texts[i]) for i in ids], gen)
        if parent is not None:
            ptable = parent.table(level)
            pos = ptable.positions(ids)
            for j, p in enumerate(pos):
                if p >= 0 and ptable.prompt_sha256[p] == work.hashes[j]:
                    work.reused[ids[j]] = (ptable.responses[p], ptable.embeddings[p])
        levels[level] = work

    build_key = _sha(
        {
            "dataset": dataset.fingerprint(),
            "split": split.fingerprint(),
            "space": space_base,
            "prompts": config.prompts.to_dict(),
            "generation": gen_settings,
            "backend": config.backend.backend,
            "dtype": config.backend.dtype,
            "reduce_dim": config.reduce_dim,
            "new_space": config.new_space,
            "parent": parent.version if parent else None,
            "shard_size": config.shard_size,
        }
    )
    vdir = _find_unfinished(root, build_key)
    if vdir is not None:
        log.info("resuming unfinished build %s", vdir.name)
    else:
        vdir = root / _new_version(root, build_key)
        (vdir / WORK).mkdir(parents=True)
        (vdir / WORK / BUILD_KEY_FILE).write_text(json.dumps({"key": build_key}) + "\n")
    work_dir = vdir / WORK
    version = vdir.name

    # 3. LLM work, shard by shard.
    executor: Executor | None = None
    computed_raw: dict[str, dict[str, tuple[str, np.ndarray]]] = {lvl: {} for lvl in LEVELS}
    rates: dict[str, float] = {}
    truncated: dict[str, int] = {}
    tokenizer = None

    def get_tokenizer():
        nonlocal tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        return tokenizer

    def model_tokens(key: str, op: str, texts: list[str]) -> list[int]:
        """Tokens the model sees per text (after the cut to max_length); counts the texts the backend will cut (all
        pending rows, resumed or not) into `truncated`."""
        lengths = input_lengths(get_tokenizer(), texts, op, config.backend)
        truncated[key] = sum(n > config.backend.max_length for n in lengths)
        return [min(n, config.backend.max_length) for n in lengths]

    def get_executor() -> Executor:
        nonlocal executor
        if executor is None:
            if executor_factory is not None:
                executor = executor_factory()
            elif config.engine == "ray":
                from offline.knowledge.ray_engine import RayExecutor

                executor = RayExecutor(config)
            else:
                executor = Executor(config.backend)
        return executor

    def run_phase(work: LevelWork, phase: str, texts_of: Callable[[list[int]], list[str]]) -> dict[int, tuple]:
        """Runs one phase (gen or emb) over the pending rows; returns row index -> (response, vector)."""
        pending = work.pending()
        lengths = [len(t) for t in work.texts]
        plan = plan_shards(pending, lengths, config.shard_size)
        op = "generate" if phase == "gen" else "embed"
        truncated[f"{work.level}_{op}"] = 0
        tokens: dict[int, int] = {}
        if pending:
            tokens = dict(zip(pending, model_tokens(f"{work.level}_{op}", op, texts_of(pending)), strict=True))
        results: dict[int, tuple] = {}
        todo: list[int] = []
        for k, rows in enumerate(plan):
            path = _shard_path(work_dir, work.level, phase, k)
            if path.exists():
                ids, responses, emb = _read_shard(path)
                if ids == [work.ids[i] for i in rows]:
                    for j, i in enumerate(rows):
                        results[i] = (responses[j], None if emb is None else emb[j])
                    continue
            todo.append(k)
        if not todo:
            return results
        from tqdm import tqdm

        unit = work.level
        bar = tqdm(
            total=sum(len(plan[k]) for k in todo),
            desc=f"{work.level} {'generate' if phase == 'gen' else 'embed'}",
            unit=unit,
            disable=not config.progress,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        texts = [texts_of(plan[k]) for k in todo]
        for n, result in get_executor().map(op, texts, config.pooling, progress=bar.update):
            k = todo[n]
            rows = plan[k]
            ids = [work.ids[i] for i in rows]
            if op == "generate":
                _write_shard(_shard_path(work_dir, work.level, phase, k), ids, list(result), None)
                for j, i in enumerate(rows):
                    results[i] = (result[j], None)
            else:
                responses = [computed_responses.get(i, "") for i in rows] if work.generate else [""] * len(rows)
                _write_shard(_shard_path(work_dir, work.level, phase, k), ids, responses, result)
                for j, i in enumerate(rows):
                    results[i] = (responses[j], result[j])
            if on_shard is not None:
                on_shard(work.level, phase, k)
        bar.close()
        seconds = max(time.perf_counter() - start, 1e-9)
        rows_done = [i for k in todo for i in plan[k]]
        n_tokens = sum(tokens[i] for i in rows_done)
        if op == "generate":
            new = sum(encoded_lengths(get_tokenizer(), [results[i][0] for i in rows_done], op))
            rates[f"{work.level}_{op}_new_tokens_per_s"] = new / seconds
            n_tokens += new
        rates[f"{work.level}_{op}_per_s"] = len(rows_done) / seconds
        # Prompt (+ generated) tokens per second: comparable across levels and with a bare forward of the model.
        rates[f"{work.level}_{op}_tokens_per_s"] = n_tokens / seconds
        return results

    try:
        answers: dict[str, dict[int, str]] = {}
        for level in META_LEVELS:
            work = levels[level]
            if work.generate:
                res = run_phase(work, "gen", lambda rows, w=work: [w.texts[i] for i in rows])
                answers[level] = {i: r for i, (r, _) in res.items()}
        if any(w.generate for w in levels.values()) and executor is not None:
            executor.end_generation()
        for level in LEVELS:
            work = levels[level]
            computed_responses = answers.get(level, {})
            if work.generate:
                # generate mode (the paper's): embed the prompt followed by the model's answer.
                def texts_of(rows, w=work, a=computed_responses):
                    return [w.texts[i] + " " + a[i] for i in rows]
            else:

                def texts_of(rows, w=work):
                    return [w.texts[i] for i in rows]

            res = run_phase(work, "emb", texts_of)
            for i, (resp, vec) in res.items():
                computed_raw[level][work.ids[i]] = (resp, vec)
    finally:
        if executor is not None:
            executor.close()
    _warn_truncated(truncated, config.backend.max_length)

    # 4. Reduce.
    reducer_path = vdir / REDUCER_FILE
    red_sha = None
    dim = raw_dim
    reducer = None
    if config.reduce_dim is not None:
        if reuse_reducer:
            assert parent is not None
            shutil.copyfile(parent.path / REDUCER_FILE, reducer_path)
            reducer = load_reducer(reducer_path)
        else:
            fit_on = np.concatenate(
                [np.stack([v for _, v in computed_raw[lvl].values()]) for lvl in ("user", "item") if computed_raw[lvl]]
            )
            reducer = fit_pca(fit_on, config.reduce_dim)
            save_reducer(reducer_path, *reducer)
        red_sha = reducer_sha(*reducer)
        dim = config.reduce_dim

    space = KnowledgeSpace(raw_dim=raw_dim, dim=dim, reducer_sha256=red_sha, **space_base)

    # 5. Tables.
    counts, computed, reused = {}, {}, {}
    for level in LEVELS:
        work = levels[level]
        emb = np.zeros((len(work.ids), dim), dtype=np.float32)
        responses = []
        fresh_ids = [i for i in work.ids if i in computed_raw[level]]
        if fresh_ids:
            raw = np.stack([computed_raw[level][i][1] for i in fresh_ids])
            fresh = apply_reducer(raw, *reducer) if reducer is not None else raw
            fresh_map = dict(zip(fresh_ids, fresh, strict=True))
        else:
            fresh_map = {}
        for j, id_ in enumerate(work.ids):
            if id_ in fresh_map:
                emb[j] = fresh_map[id_]
                responses.append(computed_raw[level][id_][0])
            else:
                resp, vec = work.reused[id_]
                emb[j] = vec
                responses.append(resp)
        write_table(vdir / f"{table_name(level)}.parquet", KnowledgeTable(work.ids, emb, work.hashes, responses))
        counts[level] = len(work.ids)
        computed[level] = len(fresh_map)
        reused[level] = len(work.reused)
        if level == "user":
            # Cold-start users get the mean user vector: it lies in the distribution the model was trained on,
            # unlike the vector of an empty-history prompt.
            default = emb.mean(0, keepdims=True) if len(emb) else np.zeros((1, dim), np.float32)
            write_table(
                vdir / f"{DEFAULTS}.parquet",
                KnowledgeTable([DEFAULT_USER_ID], default, ["mean-of-users"], [""]),
            )

    _write_prompts(vdir, levels)
    seconds = time.perf_counter() - t0
    manifest = Manifest(
        version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        space=space,
        dataset_fingerprint=dataset.fingerprint(),
        split_fingerprint=split.fingerprint(),
        counts=counts,
        backend=config.backend.backend,
        parent_version=parent.version if parent else None,
        computed=computed,
        reused=reused,
        dtype=dtype.dtype,
        hardware=dtype.to_dict(),
        truncated=truncated,
        extra={
            "dataset": dataset.name,
            "split_config": config.split.to_dict(),
            "prompt_config": config.prompts.to_dict(),
            "generation": gen_settings,
            "backend_config": {k: v for k, v in asdict(config.backend).items() if k != "vllm_python"},
            "engine": config.engine,
            "templates": P.TEMPLATES,
            "default_user": "mean of user vectors",
            "rates": rates,
            "build_seconds": round(seconds, 3),
        },
    )
    write_manifest(vdir, manifest)
    shutil.rmtree(work_dir, ignore_errors=True)
    _prune_unfinished(root, keep=vdir)
    return BuildResult(vdir, manifest, seconds)


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


def _write_prompts(vdir: Path, levels: dict[str, LevelWork]) -> None:
    """The exact prompts beside the vectors (for `knowledge show` and audits); not part of the contract."""
    from offline.knowledge.show import PROMPTS_FILE

    lv, ids, texts = [], [], []
    for level, work in levels.items():
        lv += [table_name(level)] * len(work.ids)
        ids += work.ids
        texts += work.texts
    table = pa.table({"level": lv, "id": ids, "prompt": texts})
    tmp = vdir / (PROMPTS_FILE + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, vdir / PROMPTS_FILE)


def _prune_unfinished(root: Path, keep: Path) -> None:
    """Removes abandoned unfinished versions (their inputs changed; they can never resume)."""
    for d in root.iterdir():
        if d.is_dir() and d != keep and not (d / MANIFEST).exists() and (d / WORK / BUILD_KEY_FILE).exists():
            shutil.rmtree(d, ignore_errors=True)


def config_with(config: KnowledgeConfig, **changes) -> KnowledgeConfig:
    return replace(config, **changes)
