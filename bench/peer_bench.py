"""Library baselines on the same split: torch-rechub's DCN-v2 and DeepFM beside our plain STAR and LLM4MSR STAR.

A ranker is only worth its cost if it beats what a well-kept CTR library gives on the same data. This bench exports
the exact split with `llm4msr data split`, trains torch-rechub's DCN-v2 and DeepFM on those files (features
user_id, item_id, scenario and the item's category: the scenario is one more categorical feature), and trains our
STAR plain and with LLM4MSR (when a knowledge snapshot is given) through the `llm4msr train` command on the same
dataset and split settings.

Every model gets the same training protocol as `llm4msr train`: Adam (lr 1e-3), batches of 2048, at most
--epochs epochs, early stopping on validation AUC with patience 1 (the best epoch's weights are kept), embedding
size 16, and the same torch thread count (--threads). Test AUC, logloss and per-scenario AUC are computed on the
held-out test rows; samples/s is the median over epochs of training rows per second of the training loop; wall is
the whole run of one model (data loading, every epoch, evaluation).

    pip install -e '.[bench]'
    python bench/peer_bench.py --data ../shared/data/amazon-arts-office [--knowledge KN_DIR] [--seeds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ("user_id", "item_id", "scenario", "category")
PEER_MODELS = ("dcn_v2", "deepfm")


@dataclass
class Result:
    """One model, one seed."""

    model: str
    seed: int
    test_auc: float
    test_logloss: float
    scenario_auc: dict[str, float]
    samples_per_s: float
    epochs: int
    wall_s: float
    extra: dict = field(default_factory=dict)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def export_split(data: Path, out: Path) -> Path:
    """The exact labelled rows every model reads (`llm4msr data split`)."""
    run_cli(["data", "split", str(data), "--out", str(out), "--format", "csv", "--overwrite"])
    return out


def run_cli(args: list[str], threads: int | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"llm4msr {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


# --- torch-rechub models --------------------------------------------------------------------------------------------


def encode_split(split_dir: Path, data: Path) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Split rows with integer codes per feature: vocabularies from the train rows, 0 = unseen (as ours)."""
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    category = dict(zip(items["item_id"], items["category"], strict=True)) if "category" in items else {}
    frames = {
        part: pd.read_csv(split_dir / f"{part}.csv", dtype=str, keep_default_na=False)
        for part in ("train", "valid", "test")
    }
    for frame in frames.values():
        frame["category"] = frame["item_id"].map(category).fillna("")
        frame["label"] = frame["label"].astype(np.float32)
        frame["scenario_name"] = frame["scenario"]
    sizes = {}
    for name in FEATURES:
        vocab = pd.Index(pd.unique(frames["train"][name]))
        sizes[name] = len(vocab) + 1
        for frame in frames.values():
            frame[name] = vocab.get_indexer(frame[name]) + 1  # -1 (unseen) -> 0
    return frames, sizes


def build_peer(name: str, sizes: dict[str, int], embed_dim: int):
    from torch_rechub.basic.features import SparseFeature
    from torch_rechub.models.ranking import DCNv2, DeepFM

    feats = [SparseFeature(f, vocab_size=sizes[f], embed_dim=embed_dim) for f in FEATURES]
    mlp = {"dims": [256, 128], "dropout": 0.2, "activation": "relu"}
    if name == "dcn_v2":
        return DCNv2(feats, n_cross_layers=3, mlp_params=mlp, model_structure="parallel")
    if name == "deepfm":
        return DeepFM(deep_features=feats, fm_features=feats, mlp_params=mlp)
    raise ValueError(f"unknown peer model {name!r}; choose from {', '.join(PEER_MODELS)}")


def predict(model, frame: pd.DataFrame, batch: int = 8192) -> np.ndarray:
    import torch

    model.eval()
    cols = {f: torch.from_numpy(frame[f].to_numpy(np.int64, copy=True)) for f in FEATURES}
    out = []
    with torch.inference_mode():
        for start in range(0, len(frame), batch):
            out.append(model({f: c[start : start + batch] for f, c in cols.items()}).float().numpy())
    return np.concatenate(out).reshape(-1)


def auc_logloss(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    auc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")
    return auc, float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1]))


def train_peer(name: str, frames: dict[str, pd.DataFrame], sizes: dict[str, int], seed: int, args) -> Result:
    """Our trainer's protocol around a torch-rechub model."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    model = build_peer(name, sizes, args.embed_dim)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = frames["train"]
    cols = {f: torch.from_numpy(train[f].to_numpy(np.int64, copy=True)) for f in FEATURES}
    label = torch.from_numpy(train["label"].to_numpy(np.float32, copy=True))
    gen = torch.Generator().manual_seed(seed)
    best, best_state, rates, epochs = -1.0, None, [], 0
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(label), generator=gen)
        t0 = time.perf_counter()
        for s in range(0, len(perm), args.batch_size):
            idx = perm[s : s + args.batch_size]
            pred = model({f: c.index_select(0, idx) for f, c in cols.items()})
            loss = torch.nn.functional.binary_cross_entropy(pred.reshape(-1), label.index_select(0, idx))
            optim.zero_grad()
            loss.backward()
            optim.step()
        rates.append(len(perm) / (time.perf_counter() - t0))
        epochs += 1
        valid_auc, _ = auc_logloss(frames["valid"]["label"].to_numpy(), predict(model, frames["valid"]))
        if valid_auc > best:
            best, best_state = valid_auc, {k: v.clone() for k, v in model.state_dict().items()}
        else:
            break  # patience 1, as `llm4msr train`
    model.load_state_dict(best_state)
    test = frames["test"]
    scores = predict(model, test)
    auc, logloss = auc_logloss(test["label"].to_numpy(), scores)
    per_scenario = {}
    for scenario, rows in test.groupby("scenario_name").groups.items():
        per_scenario[str(scenario)] = auc_logloss(
            test.loc[rows, "label"].to_numpy(), scores[test.index.get_indexer(rows)]
        )[0]
    return Result(name, seed, auc, logloss, per_scenario, statistics.median(rates), epochs, time.perf_counter() - start)


# --- our models -----------------------------------------------------------------------------------------------------


def train_ours(name: str, data: Path, knowledge: Path | None, seed: int, work: Path, split_fp: str, args) -> Result:
    """`llm4msr train` in its own process; the metrics and per-epoch rates come from the artifact's config. It
    splits the dataset with the same settings as the export: checked by the split fingerprint."""
    out = work / f"{name}-seed{seed}"
    cmd = ["train", "--data", str(data), "--backbone", "star", "--seed", str(seed), "--threads", str(args.threads)]
    cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--embed-dim", str(args.embed_dim)]
    cmd += ["--out", str(out), "--overwrite", "--no-progress"]
    cmd += ["--knowledge", str(knowledge)] if knowledge else ["--no-llm4msr"]
    start = time.perf_counter()
    run_cli(cmd, threads=args.threads)
    wall = time.perf_counter() - start
    config = json.loads((out / "config.json").read_text())
    if config["split_fingerprint"] != split_fp:
        raise SystemExit(
            f"{name} trained on split {config['split_fingerprint'][:12]}, not the exported {split_fp[:12]}"
        )
    test = config["metrics"]["test"]
    history = config["train"]["history"]
    return Result(
        name,
        seed,
        float(test["overall"]["auc"]),
        float(test["overall"]["logloss"]),
        {s: float(m["auc"]) for s, m in test["per_scenario"].items()},
        statistics.median(h["samples_per_s"] for h in history),
        len(history),
        wall,
        {"levels": config.get("levels"), "llm4msr": config["train"].get("llm4msr")},
    )


# --- report ---------------------------------------------------------------------------------------------------------


def summarise(results: list[Result]) -> list[dict]:
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        rs = [r for r in results if r.model == model]

        def stat(values: list[float]) -> dict:
            return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

        scenarios = sorted({s for r in rs for s in r.scenario_auc})
        rows.append(
            {
                "model": model,
                "seeds": len(rs),
                "test_auc": stat([r.test_auc for r in rs]),
                "test_logloss": stat([r.test_logloss for r in rs]),
                "scenario_auc": {s: stat([r.scenario_auc[s] for r in rs if s in r.scenario_auc]) for s in scenarios},
                "samples_per_s": float(np.median([r.samples_per_s for r in rs])),
                "epochs": float(np.mean([r.epochs for r in rs])),
                "wall_s": float(np.median([r.wall_s for r in rs])),
            }
        )
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    scenarios = sorted({s for r in rows for s in r["scenario_auc"]})
    head = ["model", "test AUC", "logloss"] + [f"AUC {s}" for s in scenarios] + ["samples/s", "epochs", "wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:

        def pm(d: dict) -> str:
            return f"{d['mean']:.4f} ± {d['std']:.4f}"

        cells = [r["model"], pm(r["test_auc"]), pm(r["test_logloss"])]
        cells += [pm(r["scenario_auc"][s]) if s in r["scenario_auc"] else "-" for s in scenarios]
        cells += [f"{r['samples_per_s']:,.0f}", f"{r['epochs']:.1f}", f"{r['wall_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset folder")
    ap.add_argument("--knowledge", type=Path, help="knowledge snapshot of that dataset: adds LLM4MSR STAR")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every model")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--embed-dim", type=int, default=16)
    ap.add_argument("--models", default="star,llm4msr_star,dcn_v2,deepfm", help="comma list")
    ap.add_argument("--work", type=Path, help="keep the split and our artifacts here (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    try:
        import torch_rechub  # noqa: F401
    except ImportError:
        raise SystemExit("torch-rechub is not installed: pip install -e '.[bench]'") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "llm4msr_star" in models and not args.knowledge:
        print("no --knowledge given: LLM4MSR STAR left out", file=sys.stderr)
        models.remove("llm4msr_star")

    with tempfile.TemporaryDirectory(prefix="llm4msr-peer-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split_dir = export_split(args.data, work / "split")
        frames, sizes = encode_split(split_dir, args.data)
        split_info = json.loads((split_dir / "split.json").read_text())
        results: list[Result] = []
        for seed in range(args.seeds):
            for model in models:
                if model in PEER_MODELS:
                    results.append(train_peer(model, frames, sizes, seed, args))
                else:
                    knowledge = args.knowledge if model == "llm4msr_star" else None
                    fp = split_info["split_fingerprint"]
                    results.append(train_ours(model, args.data, knowledge, seed, work, fp, args))
                r = results[-1]
                print(f"{r.model} seed {seed}: test AUC {r.test_auc:.4f}, {r.samples_per_s:,.0f} samples/s", flush=True)

    rows = summarise(results)
    header = (
        f"{args.data.name}: {split_info['rows']['train']:,} train / {split_info['rows']['test']:,} test rows, "
        f"{args.seeds} seed(s), {args.threads} threads, CPU {cpu_name()}"
    )
    print_table(rows, header)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bench": "peer",
                    "data": str(args.data),
                    "split_fingerprint": split_info["split_fingerprint"],
                    "cpu": cpu_name(),
                    "threads": args.threads,
                    "rows": rows,
                    "runs": [asdict(r) for r in results],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
