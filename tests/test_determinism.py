"""Reproducible training (issue 18): the same seed gives a byte-identical model at 2 threads, for every backbone and
level set, and `evaluate` reproduces the metrics stored at training time.

The trainings run in two worker processes (this file run as a script) with different Python hash seeds, as two
`llm4msr train` invocations would: thread pools, hash order and allocator state are per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import train_tiny_artifact, write_planted_snapshot

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from offline.training.trainer import deterministic_ops
from shared.artifact import load_artifact
from shared.dataset.folder import read_dataset
from shared.models.backbones import backbone_names
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.llm4msr import LLM4MSRConfig

BACKBONES = tuple(backbone_names())
LEVEL_SETS = {"plain": None, "su": ("scenario", "user"), "sui": ("scenario", "user", "item")}
THREADS = 2


def _train_all(data_dir: Path, snapshot_dir: Path, out: Path) -> None:
    """Worker: trains every backbone x level set at THREADS threads and writes one artifact each under out."""
    for backbone in BACKBONES:
        for name, levels in LEVEL_SETS.items():
            train_tiny_artifact(
                data_dir,
                snapshot_dir,
                out / f"{backbone}__{name}",
                backbone=backbone,
                levels=levels or ("scenario", "user"),
                llm4msr=levels is not None,
                epochs=1,
                # Large enough for torch's multi-threaded kernels: 256 rows x 128 units is one grain (32768
                # values), below which an accumulation runs on one thread and hides a nondeterministic op.
                batch_size=256,
                threads=THREADS,
            )


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_model_backward_is_deterministic_without_torch_deterministic_mode(backbone, two_threads):
    """The models avoid nondeterministic backwards themselves (the trainer's deterministic mode is only a guard):
    at 2 threads, repeated backward passes on one training batch give bit-equal gradients, for every level set."""
    rows, dim = 4096, 24
    gen = torch.Generator().manual_seed(0)
    fields = torch.stack(
        [torch.randint(0, 400, (rows,), generator=gen), torch.randint(0, 300, (rows,), generator=gen)], dim=1
    )
    scenario = torch.randint(0, 3, (rows,), generator=gen)
    fields = torch.cat([fields, scenario[:, None]], dim=1)
    labels = torch.randint(0, 2, (rows,), generator=gen).float()
    for levels in LEVEL_SETS.values():
        torch.manual_seed(0)
        wrapper = LLM4MSRConfig(levels=list(levels), knowledge_dim=dim) if levels else None
        config = ModelConfig(
            fields=[("user_id", 400), ("item_id", 300), ("scenario", 4)],
            n_scenarios=3,
            backbone=backbone,
            llm4msr=wrapper,
        )
        model = CTRModel(config).train()
        # As in training: reduced vectors, the scenario level as the [S, r] table of all scenarios.
        knowledge = {lv: torch.randn(3 if lv == "scenario" else rows, dim, generator=gen) for lv in levels or ()}
        grads = []
        with deterministic_ops(False):
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(model(fields, scenario, knowledge, True), labels).backward()
                grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        differ = sorted({n for g in grads[1:] for n in g if not torch.equal(g[n], grads[0][n])})
        assert not differ, f"{backbone} {levels}: gradients differ between identical backward passes: {differ}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _close(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _mismatches(evaluated: dict, stored: dict, tol: float = 1e-6) -> list[str]:
    """'split/block/metric: a vs b' for every metric of every block that differs by more than tol."""
    out = []
    for split, m in stored.items():
        blocks = {"overall": m["overall"], **m["per_scenario"]}
        got = {"overall": evaluated[split]["overall"], **evaluated[split]["per_scenario"]}
        for block, values in blocks.items():
            for key, value in values.items():
                if not _close(float(got[block][key]), float(value), tol):
                    out.append(f"{split}/{block}/{key}: {got[block][key]} vs {value}")
    return out


def test_same_seed_same_bytes_at_two_threads(synth_dir, tmp_path, capsys):
    dataset = read_dataset(synth_dir)
    kn = write_planted_snapshot(dataset, make_split(dataset, SplitConfig()), tmp_path / "kn")
    runs = [tmp_path / "run1", tmp_path / "run2"]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(synth_dir), str(kn), str(out)],
            env={**os.environ, "PYTHONHASHSEED": str(i + 1), "OMP_NUM_THREADS": str(THREADS)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(runs)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    names = [f"{b}__{n}" for b in BACKBONES for n in LEVEL_SETS]
    differ = [
        n for n in names if _sha256(runs[0] / n / "model.safetensors") != _sha256(runs[1] / n / "model.safetensors")
    ]
    assert not differ, f"same seed, different model.safetensors at {THREADS} threads: {differ}"

    for name in names:
        config = load_artifact(runs[0] / name).config
        # The artifact says what a reproduction needs: torch's version and the threads actually used.
        assert config.train["torch_version"] == torch.__version__
        assert config.train["threads"] == THREADS and config.train["torch_threads"] == THREADS
        assert config.train["deterministic"] is True
        # evaluate (the serving scorer, other batch sizes) reproduces the metrics stored at training time.
        args = ["evaluate", str(runs[0] / name), "--data", str(synth_dir), "--knowledge", str(kn), "--json"]
        assert llm4msr_cli.main(args) == 0
        mismatches = _mismatches(json.loads(capsys.readouterr().out)["metrics"], config.metrics)
        assert not mismatches, f"{name}: evaluate differs from the metrics stored at training: {mismatches}"
    # ... and evaluating twice gives the same numbers exactly.
    args = ["evaluate", str(runs[1] / "star__sui"), "--data", str(synth_dir), "--knowledge", str(kn), "--json"]
    assert llm4msr_cli.main(args) == 0
    first = capsys.readouterr().out
    assert llm4msr_cli.main(args) == 0
    assert capsys.readouterr().out == first


if __name__ == "__main__":
    _train_all(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
