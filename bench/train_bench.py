"""Training and request-forward benchmark: each backbone plain vs. with the LLM4MSR wrapper.

Measures (1) training samples/s over a fixed number of batches, (2) the time of one ranking request (one user, one
scenario, N candidates, default 500) through RequestScorer.score, the median of calls timed in rounds that
alternate between plain and wrapped models (fair under background load). Without --data it uses
the synthetic generator scaled up and a random knowledge snapshot of SmolLM2's size (576): speed does not depend
on the vectors' content.

    python bench/train_bench.py [--data DIR --knowledge SNAPSHOT] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.training.trainer import (  # noqa: E402
    KnowledgeTables,
    TrainConfig,
    batch_knowledge,
    build_model,
    encode_split,
    make_optimizer,
)
from shared.artifact import Artifact, ArtifactConfig  # noqa: E402
from shared.dataset.split import SplitConfig, make_split  # noqa: E402
from shared.knowledge.snapshot import (  # noqa: E402
    DEFAULT_USER_ID,
    KnowledgeSnapshot,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)
from shared.models.features import FeatureEncoder  # noqa: E402
from shared.scoring import RequestKnowledge, RequestScorer  # noqa: E402

VARIANTS = {"plain": None, "llm_su": ["scenario", "user"], "llm_sui": ["scenario", "user", "item"]}


def random_snapshot(dataset, split, root: Path, dim: int) -> KnowledgeSnapshot:
    rng = np.random.default_rng(0)

    def table(ids):
        ids = [str(i) for i in ids]
        return KnowledgeTable(
            ids, rng.normal(size=(len(ids), dim)).astype(np.float32), [""] * len(ids), [""] * len(ids)
        )

    vdir = root / "v1"
    vdir.mkdir(parents=True)
    write_table(vdir / "scenarios.parquet", table(dataset.scenario_names))
    write_table(vdir / "users.parquet", table(dataset.interactions["user_id"].unique()))
    write_table(vdir / "items.parquet", table(dataset.items["item_id"]))
    write_table(vdir / "defaults.parquet", table([DEFAULT_USER_ID]))
    space = KnowledgeSpace(model="random", template_sha256="", pooling="mean", mode="encode", raw_dim=dim, dim=dim)
    write_manifest(
        vdir,
        Manifest("v1", "", space, split.dataset_fingerprint, split.fingerprint(), {}),
    )
    return KnowledgeSnapshot(vdir)


def bench_one(backbone, levels, dataset, split, snapshot, encoder, args) -> tuple[dict, dict[str, Callable]]:
    """Trains a few timed steps; returns the results and the request calls that time_requests times."""
    cfg = TrainConfig(
        backbone=backbone,
        llm4msr=levels is not None,
        levels=levels or ["scenario", "user"],
        batch_size=args.batch_size,
        threads=args.threads,
        progress=False,
    )
    torch.manual_seed(0)
    tables = KnowledgeTables(snapshot, encoder.scenarios, levels) if levels else None
    model = build_model(cfg, encoder, snapshot.space.dim if levels else 0)
    if tables is not None:
        tables.fit_and_reduce(model)
    data = encode_split(split.train, encoder, tables)
    optim = make_optimizer(model, cfg)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    perm = torch.randperm(len(data))
    steps = min(args.batches, len(data) // args.batch_size)
    times = []
    for step in range(steps + 3):
        idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
        t0 = time.perf_counter()
        loss = loss_fn(
            model(
                data.rows("fields", idx),
                data.rows("scenario", idx),
                batch_knowledge(tables, data, idx),
                tables is not None,
            ),
            data.rows("label", idx),
        )
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    # Median step time: robust to other processes on a shared machine (the mean is reported too).
    samples_per_s = args.batch_size / float(np.median(times))
    mean_samples_per_s = args.batch_size * len(times) / sum(times)
    # One request through the serving path.
    model.eval()
    art = Artifact(
        config=ArtifactConfig.model_construct(knowledge_dim=snapshot.space.dim, model_version="bench"),
        model=model,
        encoder=encoder,
    )
    scorer = RequestScorer(art)
    items = split.test["item_id"].unique()
    rng = np.random.default_rng(0)
    cand = [str(i) for i in rng.choice(items, size=args.candidates, replace=len(items) < args.candidates)]
    user = str(split.test["user_id"].iloc[0])
    scen = encoder.scenarios[0]
    d = snapshot.space.dim
    kn = RequestKnowledge(
        scenario_vec=rng.normal(size=d).astype(np.float32),
        user_vec=rng.normal(size=d).astype(np.float32),
        item_vecs=rng.normal(size=(args.candidates, d)).astype(np.float32),
    )
    requests = {"raw": lambda: scorer.score(scen, user, cand, kn)}
    if levels and "item" in levels:  # the ranker's path: item vectors reduced once per knowledge version
        reduced = RequestKnowledge(kn.scenario_vec, kn.user_vec, item_reduced=scorer.reduce_items(kn.item_vecs))
        requests["prereduced"] = lambda: scorer.score(scen, user, cand, reduced)
    for call in requests.values():
        for _ in range(10):
            call()
    result = {
        "samples_per_s": samples_per_s,
        "mean_samples_per_s": mean_samples_per_s,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return result, requests


def time_requests(calls: dict[str, dict[str, Callable]], total: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    """Times every variant's request in alternating rounds (each round a different order), so that background
    load on a shared machine hits all variants alike; returns the seconds of every call per (variant, kind)."""
    keys = [(v, kind) for v, kinds in calls.items() for kind in kinds]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    per_round = max(1, total // rounds)
    for r in range(rounds):
        for v, kind in keys[r % len(keys) :] + keys[: r % len(keys)]:
            call = calls[v][kind]
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                times[(v, kind)].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: synthetic)")
    p.add_argument("--knowledge", help="knowledge snapshot built on --data's default split")
    p.add_argument("--backbones", default="shared_bottom,mmoe,ple,star")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--requests", type=int, default=300, help="timed requests per variant (all rounds together)")
    p.add_argument("--rounds", type=int, default=6, help="alternations between the variants when timing requests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=576, help="knowledge dim of the random snapshot")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from shared.dataset.folder import read_dataset
    from shared.dataset.synth import SynthConfig, generate

    if args.data:
        dataset = read_dataset(args.data)
    else:
        dataset = generate(SynthConfig(users=3000, items_per_scenario=2000, main_impressions=40, side_impressions=10))
    split = make_split(dataset, SplitConfig())
    tmp = tempfile.TemporaryDirectory()
    snapshot = (
        KnowledgeSnapshot(args.knowledge)
        if args.knowledge
        else random_snapshot(dataset, split, Path(tmp.name), args.dim)
    )
    encoder = FeatureEncoder.fit(dataset, split.train)
    rows = []
    for backbone in args.backbones.split(","):
        results, calls = {}, {}
        for variant, levels in VARIANTS.items():
            results[variant], calls[variant] = bench_one(backbone, levels, dataset, split, snapshot, encoder, args)
        times = time_requests(calls, args.requests, args.rounds)
        base = results["plain"]
        base_ms = 1000 * float(np.median(times[("plain", "raw")]))
        for variant, r in results.items():
            req = times[(variant, "raw")]
            fast = times.get((variant, "prereduced"))
            r.update(
                backbone=backbone,
                variant=variant,
                request_ms_p50=1000 * float(np.median(req)),
                request_ms_p95=1000 * float(np.percentile(req, 95)),
                request_ms_p50_prereduced=1000 * float(np.median(fast)) if fast else None,
            )
            r["train_time_ratio"] = base["samples_per_s"] / r["samples_per_s"]
            r["request_time_ratio"] = r["request_ms_p50"] / base_ms
            fast_ms = r["request_ms_p50_prereduced"]
            r["request_time_ratio_prereduced"] = fast_ms / base_ms if fast_ms else None
            rows.append(r)
            print(
                f"{backbone:<14} {variant:<8} {r['samples_per_s']:>10.0f} samples/s  x{r['train_time_ratio']:.2f} time"
                f"   request({args.candidates}) p50 {r['request_ms_p50']:6.2f} ms  x{r['request_time_ratio']:.2f}"
                + (
                    f"  pre-reduced items {fast_ms:.2f} ms x{r['request_time_ratio_prereduced']:.2f}" if fast_ms else ""
                ),
                flush=True,
            )
    meta = {
        "dataset": dataset.name,
        "train_rows": len(split.train),
        "knowledge_dim": snapshot.space.dim,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "candidates": args.candidates,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
