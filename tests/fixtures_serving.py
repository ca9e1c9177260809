"""Helpers for the serving tests: real knowledge snapshots, Redis publishing, and a real uvicorn subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    DEFAULTS,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]


def make_space(dim: int = 8, model: str = "test-vectors") -> KnowledgeSpace:
    return KnowledgeSpace(model=model, template_sha256="0" * 64, pooling="mean", mode="encode", raw_dim=dim, dim=dim)


def seeded_table(ids: Sequence[str], dim: int, seed: int, answer: str | None) -> KnowledgeTable:
    """Seeded normal vectors with a prompt hash per id and, given a template, a readable answer."""
    rng = np.random.default_rng(seed)
    return KnowledgeTable(
        ids=list(ids),
        embeddings=rng.normal(size=(len(ids), dim)).astype(np.float32),
        prompt_sha256=[hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids],
        responses=[(answer.format(id=i) if answer else "") for i in ids],
    )


def write_snapshot(
    root: Path,
    version: str,
    scenarios: Sequence[str],
    users: Sequence[str],
    items: Sequence[str],
    space: KnowledgeSpace,
    seed: int = 0,
    split_fingerprint: str = "test",
) -> Path:
    """A real snapshot version (Parquet + manifest, LATEST updated) with seeded vectors and readable answers."""
    out = Path(root) / version
    out.mkdir(parents=True, exist_ok=True)
    dim = space.dim
    write_table(out / "scenarios.parquet", seeded_table(scenarios, dim, seed + 1, "Scenario {id}: answer " + version))
    write_table(out / "users.parquet", seeded_table(users, dim, seed + 2, "User {id} likes things (" + version + ")"))
    write_table(out / "items.parquet", seeded_table(items, dim, seed + 3, None))
    write_table(out / f"{DEFAULTS}.parquet", seeded_table([DEFAULT_USER_ID], dim, seed + 4, None))
    manifest = Manifest(
        version=version,
        created_at="2024-01-01T00:00:00Z",
        space=space,
        dataset_fingerprint="test",
        split_fingerprint=split_fingerprint,
        counts={"scenarios": len(scenarios), "users": len(users), "items": len(items)},
        backend="test",
    )
    write_manifest(out, manifest)
    return out


def publish(snapshot_dir: Path, redis_url: str, keep_old: int = 1, vector_format: str = "float32") -> str:
    """Publishes a snapshot to Redis with the knowledge job's own publisher (flips llm4msr:kn:current); float32, so
    that scores compare exactly with the snapshot's (the compact formats have their own tests)."""
    from offline.knowledge.publish import publish_snapshot

    return publish_snapshot(snapshot_dir, redis_url, keep_old=keep_old, vector_format=vector_format)


@dataclass
class ServerProcess:
    """`llm4msr serve` as a real uvicorn subprocess on a free loopback port."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    args: list[str], log_path: Path, env: dict | None = None, wait_ready: bool = True, timeout: float = 90.0
) -> ServerProcess:
    import httpx

    from tests.conftest import free_port

    port = free_port()
    # One worker unless the test asks for more (LLM4MSR_WORKERS): the default, one per core, is its own test.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "LLM4MSR_WORKERS": "1", **(env or {})}
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm4msr_cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(proc, port, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            r = httpx.get(f"{server.url}/readyz" if wait_ready else f"{server.url}/healthz", timeout=1.0)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready in {timeout} s:\n{server.log()}")


FEATURE_VALUES = ("mobile", "web", "tv")

VARIANT_LEVELS = {"plain": [], "llm4msr": ["scenario", "user"], "llm4msr-item": ["scenario", "user", "item"]}


@dataclass
class ServingWorld:
    """A synthetic dataset, its split, a knowledge snapshot built on that split, and trained artifacts."""

    data_dir: Path
    split: object
    knowledge_root: Path
    artifacts: dict[str, Path]
    users: list[str]
    items: list[str]
    scenarios: list[str]

    @property
    def snapshot_dir(self) -> Path:
        return self.knowledge_root / "v1"


def build_world(
    root: Path,
    users: int = 60,
    variants: Sequence[str] = ("llm4msr-item", "plain"),
    dim: int = 8,
    epochs: int = 1,
    items_per_scenario: int = 40,
    feature_column: str | None = None,
) -> ServingWorld:
    """Trains tiny real artifacts (seconds on CPU) on seeded knowledge vectors of a real snapshot.

    Variants: `plain` (STAR backbone alone), `llm4msr` (the paper's scenario + user levels) and `llm4msr-item`
    (scenario, user and item levels, so that every lookup path of the ranker is exercised). `feature_column` adds
    an extra categorical interaction column (values FEATURE_VALUES, seeded), which the models then read from
    candidates.
    """
    from offline.data.split import make_split
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import read_dataset, write_dataset
    from tests.fixtures_models import train_tiny_artifact

    root = Path(root)
    data_dir = root / "data"
    synth = generate(
        SynthConfig(users=users, items_per_scenario=items_per_scenario, main_impressions=20, side_impressions=5)
    )
    if feature_column:
        rng = np.random.default_rng(3)
        synth.interactions[feature_column] = rng.choice(FEATURE_VALUES, size=len(synth.interactions))
    write_dataset(synth, data_dir)
    dataset = read_dataset(data_dir)
    split = make_split(dataset)
    scen = dataset.scenario_names
    train_users = sorted(split.train_positives()["user_id"].astype(str).unique())
    items = dataset.items["item_id"].astype(str).tolist()
    # Leave one catalogue item without knowledge, so the "unknown item" path is real.
    kn_root = root / "knowledge"
    vdir = write_snapshot(
        kn_root, "v1", scen, train_users, items[:-1], make_space(dim), seed=11, split_fingerprint=split.fingerprint()
    )
    artifacts = {}
    for name in variants:
        levels = {"levels": tuple(VARIANT_LEVELS[name])} if VARIANT_LEVELS[name] else {}  # plain: no LLM4MSR at all
        # The seeded snapshot has no fit user vectors (they matter to training's leakage protocol, not to serving).
        levels["user_knowledge"] = "full-history"
        artifacts[name] = train_tiny_artifact(
            data_dir,
            vdir if name != "plain" else None,
            root / f"artifact-{name}",
            **levels,
            llm4msr=name != "plain",
            epochs=epochs,
            batch_size=512,
            seed=0,
        )
    return ServingWorld(data_dir, split, kn_root, artifacts, train_users, items, scen)


def wait_until(cond, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Polls `cond` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


def rank_body(user_id: str, scenario: str, items: Sequence[str], top_k: int | None = None) -> dict:
    body = {"user_id": user_id, "scenario": scenario, "candidates": [{"item_id": i} for i in items]}
    if top_k is not None:
        body["top_k"] = top_k
    return body


def worst_rank_body(
    user_id: str,
    scenario: str,
    feature_fields: Sequence[str],
    max_candidates: int = 1000,
    max_fields: int = 64,
    max_body_bytes: int = 1_000_000,
) -> bytes:
    """The costliest /rank body the limits still admit: max_candidates distinct (unknown) item_ids, each candidate
    carrying the model's own feature fields plus distinct junk fields up to max_fields with string values (the
    most tokens per byte a flat field has; fewer fields only if they do not fit), then item_ids and junk names
    made as long as the body limit allows."""
    import json

    def body(junk: int, id_len: int, key_len: int) -> bytes:
        cands = []
        for i in range(max_candidates):
            cand: dict = {"item_id": f"{i:08d}".ljust(id_len, "x")}
            cand.update({f: FEATURE_VALUES[i % len(FEATURE_VALUES)] for f in feature_fields})
            cand.update({f"{i:04d}{j:02d}".ljust(key_len, "k"): "v" for j in range(junk)})
            cands.append(cand)
        doc = {"user_id": user_id, "scenario": scenario, "candidates": cands}
        return json.dumps(doc, separators=(",", ":")).encode()

    n = max_candidates
    for junk in range(max(0, max_fields - len(feature_fields)), -1, -1):
        out = body(junk, 8, 6)
        if len(out) <= max_body_bytes:
            break
    else:
        raise ValueError(f"no body of {n} candidates fits in max_body_bytes {max_body_bytes}")
    id_len = min(256, 8 + (max_body_bytes - len(out)) // n)  # ID_MAX; each character costs n bytes
    out = body(junk, id_len, 6)
    if junk:
        out = body(junk, id_len, 6 + (max_body_bytes - len(out)) // (junk * n))
    return out


def over_limit_body(user_id: str, scenario: str, max_body_bytes: int = 1_000_000) -> bytes:
    """The issue-11 attack: one candidate with as many distinct keys as the body limit allows (~90k in 1 MB)."""
    import json

    keys = max_body_bytes // 12
    cand = {"item_id": "x", **{f"k{j}": 0 for j in range(keys)}}
    out = json.dumps({"user_id": user_id, "scenario": scenario, "candidates": [cand]}, separators=(",", ":")).encode()
    while len(out) > max_body_bytes:
        keys = int(keys * 0.97)
        cand = {"item_id": "x", **{f"k{j}": 0 for j in range(keys)}}
        out = json.dumps({"user_id": user_id, "scenario": scenario, "candidates": [cand]}, separators=(",", ":"))
        out = out.encode()
    return out
