"""Vector formats against held-out quality: the same model scored with knowledge as the ranker decodes it from
Redis in each format (float32, float16, int8), on a real dataset; plus each format's reconstruction error.

The vectors go through the publisher's own codec (fitted per level on the whole snapshot, as `knowledge publish`
does) and back, exactly what RedisKnowledgeStore hands the model; the test split is then scored and AUC compared
with float32. Without --knowledge, the knowledge is the project's planted content knowledge
(tests/fixtures_models.write_planted_snapshot: item = mean of hashed title/category word vectors, user = mean of
the user's train positives) at --dim, so that the check runs on any machine; with a real LLM snapshot
(`knowledge build` output) and the artifact trained on it, it measures that model.
Usage: python bench/vector_format_bench.py [--data ../shared/data/amazon-arts-office] [--knowledge SNAP
       --artifact MODEL] [--dim 576] [--reduce-dim 256] [--epochs 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.knowledge.levels import LEVELS  # noqa: E402  (after the path set-up above)
from shared.knowledge.snapshot import KnowledgeSnapshot  # noqa: E402
from shared.knowledge.vector_codec import FORMATS, VectorCodec  # noqa: E402
from shared.scoring import SnapshotLookup  # noqa: E402


class DecodedLookup(SnapshotLookup):
    """A snapshot's vectors as the ranker reads them from a version published in one format."""

    def __init__(self, snapshot: KnowledgeSnapshot, codecs: dict[str, VectorCodec]):
        super().__init__(snapshot)
        self.codecs = codecs

    def vectors(self, level: str, ids: Sequence[str]) -> np.ndarray:
        vec = super().vectors(level, ids)
        rows = np.isfinite(vec).all(axis=1)  # NaN rows (no vector: the level's average) stay NaN
        vec[rows] = self.codecs[level].roundtrip(vec[rows])
        return vec


def level_codecs(snapshot: KnowledgeSnapshot, vector_format: str) -> dict[str, VectorCodec]:
    """The codecs `knowledge publish --vector-format` fits (one per level, on all of the level's vectors)."""
    return {level: VectorCodec.fit(vector_format, snapshot.table(level).embeddings) for level in LEVELS}


def reconstruction(snapshot: KnowledgeSnapshot, vector_format: str) -> dict:
    """Per level: RMS and max error in standard deviations of each dimension, and the smallest cosine."""
    out = {}
    for level, codec in level_codecs(snapshot, vector_format).items():
        x = snapshot.table(level).embeddings
        if len(x) < 2:
            continue
        back = codec.roundtrip(x)
        err = (back - x) / np.maximum(x.std(0), 1e-12)
        norms = np.linalg.norm(back, axis=1) * np.linalg.norm(x, axis=1)
        cos = (back * x).sum(1) / np.maximum(norms, 1e-30)
        out[level] = {
            "rms_std": float(np.sqrt((err**2).mean())),
            "max_std": float(np.abs(err).max()),
            "min_cosine": float(cos.min()),
            "bytes": codec.nbytes,
        }
    return out


def planted(data: Path, work: Path, dim: int) -> Path:
    from offline.common import load_split
    from offline.data.split import SplitConfig
    from tests.fixtures_models import write_planted_snapshot

    dataset, split = load_split(str(data), SplitConfig())
    return write_planted_snapshot(dataset, split, work / "knowledge", dim=dim, model="planted-content")


def reduced(snapshot_dir: Path, dim: int, work: Path) -> Path:
    """The snapshot in a `knowledge build --reduce-dim` space: the build's own PCA fitted on every level's vectors
    and applied to all of them (a new knowledge space: the model is trained on it)."""
    import dataclasses

    from offline.knowledge.build_reduce import apply_reducer, fit_pca, save_reducer
    from shared.knowledge.snapshot import (
        DEFAULTS,
        REDUCER_FILE,
        USER_FIT,
        KnowledgeTable,
        stored_name,
        write_manifest,
        write_table,
    )

    snap = KnowledgeSnapshot(snapshot_dir)
    mean, comps = fit_pca(np.concatenate([snap.table(level).embeddings for level in LEVELS]), dim)
    out = work / f"knowledge-r{dim}" / snap.version
    out.mkdir(parents=True)
    tables = [*LEVELS, DEFAULTS] + ([USER_FIT] if snap.has_fit_vectors else [])
    for table in tables:
        t = snap.table(table)
        emb = apply_reducer(t.embeddings, mean, comps).astype(np.float32)
        file = out / f"{stored_name(table)}.parquet"
        write_table(file, KnowledgeTable(t.ids, emb, t.prompt_sha256, t.responses))
    space = dataclasses.replace(snap.space, dim=dim, reducer_sha256=save_reducer(out / REDUCER_FILE, mean, comps))
    write_manifest(out, dataclasses.replace(snap.manifest, space=space))
    return out


def train(data: Path, snapshot: Path, out: Path, epochs: int, threads: int) -> Path:
    """STAR + LLM4MSR with the scenario, user and item levels (every knowledge path), trained by the CLI."""
    cmd = [sys.executable, "-m", "llm4msr_cli", "train", "--data", str(data), "--knowledge", str(snapshot)]
    cmd += ["--backbone", "star", "--levels", "scenario,user,item", "--out", str(out), "--epochs", str(epochs)]
    cmd += ["--batch-size", "2048", "--threads", str(threads), "--no-progress", "--overwrite"]
    if not KnowledgeSnapshot(snapshot).path.joinpath("users_fit.parquet").exists():
        cmd += ["--user-knowledge", "full-history"]  # planted knowledge has one user vector per user
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


def score_formats(data: Path, snapshot_dir: Path, artifact_dir: Path, formats: Sequence[str]) -> dict:
    from offline.common import load_split
    from offline.data.split import SplitConfig
    from offline.training.metrics import summarize
    from shared.artifact import load_artifact
    from shared.scoring import RequestScorer

    artifact = load_artifact(artifact_dir)
    scorer = RequestScorer(artifact)
    _, split = load_split(str(data), SplitConfig(**artifact.config.split_config))
    test = split.frames()["test"]
    snapshot = KnowledgeSnapshot(snapshot_dir)
    results, reference = {}, None
    for fmt in formats:
        started = time.perf_counter()
        probs = scorer.score_rows(test, DecodedLookup(snapshot, level_codecs(snapshot, fmt)))
        metrics = summarize(test, probs, (10,))
        reference = probs if reference is None else reference
        results[fmt] = {
            "auc": metrics["overall"]["auc"],
            "per_scenario_auc": {s: m["auc"] for s, m in metrics["per_scenario"].items()},
            "max_abs_score_diff": float(np.abs(probs - reference).max()),
            "mean_abs_score_diff": float(np.abs(probs - reference).mean()),
            "rows": int(len(test)),
            "score_s": time.perf_counter() - started,
            "reconstruction": reconstruction(snapshot, fmt),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-arts-office"))
    parser.add_argument("--knowledge", help="a snapshot version folder (default: planted content knowledge)")
    parser.add_argument("--artifact", help="a model trained on --knowledge (default: train one here)")
    parser.add_argument("--dim", type=int, default=576, help="planted knowledge dim (SmolLM2's width)")
    parser.add_argument("--reduce-dim", type=int, help="first reduce the knowledge as `knowledge build --reduce-dim`")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--formats", default=",".join(FORMATS), help="float32 first: the reference")
    parser.add_argument("--work", help="folder for the snapshot and model (default: a temporary one)")
    parser.add_argument("--json", help="write results as JSON here")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        print(f"no dataset at {data}", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="llm4msr-formats-"))
    snapshot = Path(args.knowledge) if args.knowledge else planted(data, work, args.dim)
    snapshot = KnowledgeSnapshot(snapshot).path
    if args.reduce_dim:
        snapshot = reduced(snapshot, args.reduce_dim, work)
    artifact = (
        Path(args.artifact) if args.artifact else train(data, snapshot, work / "model", args.epochs, args.threads)
    )
    results = score_formats(data, snapshot, artifact, args.formats.split(","))
    base = results[args.formats.split(",")[0]]["auc"]
    print(f"knowledge {snapshot} (dim {KnowledgeSnapshot(snapshot).space.dim}), model {artifact}")
    print(
        f"{'format':<9}{'test AUC':>10}{'AUC - float32':>15}{'max |dscore|':>14}{'user rms err (std)':>20}{'B/vector':>10}"
    )
    for fmt, r in results.items():
        user = r["reconstruction"].get("user", {})
        print(
            f"{fmt:<9}{r['auc']:>10.5f}{r['auc'] - base:>+15.5f}{r['max_abs_score_diff']:>14.2e}"
            f"{user.get('rms_std', float('nan')):>20.4f}{user.get('bytes', 0):>10}"
        )
    if args.json:
        meta = {
            "data": str(data),
            "knowledge": str(snapshot),
            "artifact": str(artifact),
            "machine": platform.platform(),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "formats": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
