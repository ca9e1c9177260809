"""Training and request-forward benchmark: each backbone plain vs. with the LLM4MSR wrapper.

Measures (1) training samples/s over a fixed number of batches, (2) the time of one ranking request (one user, one
scenario, N candidates, default 500) through RequestScorer.score, the median of calls timed in rounds that
alternate between plain and wrapped models (fair under background load). Without --data it uses
the synthetic generator scaled up and a random knowledge snapshot of SmolLM2's size (576): speed does not depend
on the vectors' content.

With --determinism it measures instead what deterministic training costs: the training step time with torch's
deterministic mode on (as `train` runs) and off, alternating between the two in every round on the same model,
per backbone and variant; the ratio of the medians is the cost.

    python bench/train_bench.py [--data DIR --knowledge SNAPSHOT] [--threads 1] [--determinism] [--json OUT]
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

from offline.data.split import SplitConfig, make_split  # noqa: E402
from offline.training.compare import VARIANTS as COMPARE_VARIANTS  # noqa: E402
from offline.training.trainer import (  # noqa: E402
    KnowledgeTables,
    TrainConfig,
    build_model,
    deterministic_ops,
    encode_split,
    make_optimizer,
    train_step,
)
from shared.artifact import Artifact, ArtifactConfig  # noqa: E402
from shared.knowledge.snapshot import (  # noqa: E402
    DEFAULT_USER_ID,
    KnowledgeSnapshot,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)
from shared.models.backbones import backbone_names  # noqa: E402
from shared.models.features import FeatureEncoder  # noqa: E402
from shared.scoring import RequestKnowledge, RequestScorer  # noqa: E402

# compare's variants timed here: name -> the LLM4MSR levels (None = the plain backbone)
VARIANTS = {name: COMPARE_VARIANTS[name].levels for name in ("plain", "llm_su", "llm_sui")}


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


def setup_training(backbone, levels, split, snapshot, encoder, args):
    """A fresh model (seed 0), its optimizer, knowledge tables and encoded train rows, as `train` builds them."""
    cfg = TrainConfig.from_flat(
        {
            "backbone": backbone,
            "llm4msr": levels is not None,
            "levels": levels or ["scenario", "user"],
            "batch_size": args.batch_size,
            "threads": args.threads,
            "progress": False,
        }
    )
    torch.manual_seed(0)
    tables = KnowledgeTables(snapshot, encoder.scenarios, levels) if levels else None
    model = build_model(cfg, encoder, snapshot.space.dim if levels else 0)
    if tables is not None:
        tables.fit_and_reduce(model)
    data = encode_split(split.train, encoder, tables)
    model.train()
    return model, make_optimizer(model, cfg), tables, data


def timed_steps(model, optim, tables, data, perm: torch.Tensor, first: int, count: int, batch: int) -> list[float]:
    """Seconds of `count` training steps on batches first, first + 1, ... of perm (wrapping around)."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n_batches = max(1, len(perm) // batch)
    times = []
    for step in range(first, first + count):
        b = step % n_batches
        idx = perm[b * batch : (b + 1) * batch]
        t0 = time.perf_counter()
        train_step(model, optim, loss_fn, tables, data, idx)
        times.append(time.perf_counter() - t0)
    return times


def bench_determinism(backbone, levels, split, snapshot, encoder, args) -> dict:
    """Training step time with torch's deterministic mode on and off, alternating every round (the order too) on
    one model, so that background load and the model's state hit both alike. The cost is the median over rounds of
    the ratio of the round's two median step times: pairing adjacent measurements cancels slow load changes."""
    model, optim, tables, data = setup_training(backbone, levels, split, snapshot, encoder, args)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    per_round = max(1, args.batches // args.rounds)
    timed_steps(model, optim, tables, data, perm, 0, 3, args.batch_size)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    ratios = []
    step = 3
    for r in range(args.rounds):
        medians = {}
        for deterministic in (True, False) if r % 2 == 0 else (False, True):
            with deterministic_ops(deterministic):
                t = timed_steps(model, optim, tables, data, perm, step, per_round, args.batch_size)
            times[deterministic] += t
            medians[deterministic] = float(np.median(t))
            step += per_round
        ratios.append(medians[True] / medians[False])
    return {
        "deterministic_samples_per_s": args.batch_size / float(np.median(times[True])),
        "nondeterministic_samples_per_s": args.batch_size / float(np.median(times[False])),
        "cost_ratio": float(np.median(ratios)),
        "steps_per_mode": len(times[True]),
    }


def bench_one(backbone, levels, dataset, split, snapshot, encoder, args) -> tuple[dict, dict[str, Callable]]:
    """Trains a few timed steps; returns the results and the request calls that time_requests times."""
    model, optim, tables, data = setup_training(backbone, levels, split, snapshot, encoder, args)
    perm = torch.randperm(len(data))
    steps = min(args.batches, len(data) // args.batch_size)
    with deterministic_ops():  # as `train` runs
        times = timed_steps(model, optim, tables, data, perm, 0, steps + 3, args.batch_size)[3:]  # after warm-up
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: synthetic)")
    p.add_argument("--knowledge", help="knowledge snapshot built on --data's default split")
    p.add_argument("--backbones", default=",".join(backbone_names()))
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--requests", type=int, default=300, help="timed requests per variant (all rounds together)")
    p.add_argument("--rounds", type=int, default=6, help="alternations between the variants when timing requests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=576, help="knowledge dim of the random snapshot")
    p.add_argument(
        "--determinism", action="store_true", help="measure the cost of deterministic training (see the module doc)"
    )
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def run_determinism(split, snapshot, encoder, args) -> list[dict]:
    """--determinism: the cost of torch's deterministic mode per backbone and variant."""
    rows = []
    for backbone in args.backbones.split(","):
        for variant, levels in VARIANTS.items():
            r = {"backbone": backbone, "variant": variant}
            r.update(bench_determinism(backbone, levels, split, snapshot, encoder, args))
            rows.append(r)
            print(
                f"{backbone:<14} {variant:<8} deterministic {r['deterministic_samples_per_s']:>9.0f} samples/s"
                f"  torch default {r['nondeterministic_samples_per_s']:>9.0f} samples/s"
                f"  cost x{r['cost_ratio']:.3f}",
                flush=True,
            )
    ratios = [r["cost_ratio"] for r in rows]
    print(
        f"threads {args.threads}: median cost x{np.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return rows


def run_speed(dataset, split, snapshot, encoder, args) -> list[dict]:
    """Training samples/s and request time per backbone and variant, with their ratios to the plain backbone."""
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
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import read_dataset

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
    meta = {
        "dataset": dataset.name,
        "train_rows": len(split.train),
        "knowledge_dim": snapshot.space.dim,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "candidates": args.candidates,
        "torch_version": torch.__version__,
    }
    if args.determinism:
        rows = run_determinism(split, snapshot, encoder, args)
    else:
        rows = run_speed(dataset, split, snapshot, encoder, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
