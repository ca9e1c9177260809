"""bench/peer_bench.py on a small synthetic dataset: the library baselines train on the exported split, our STAR on
the same split (fingerprint checked inside the bench), and the JSON has every model with finite metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.required import require

ROOT = Path(__file__).resolve().parent.parent


def test_peer_bench_trains_every_model_on_the_same_split(tmp_path):
    require(importlib.util.find_spec("torch_rechub"), "torch-rechub is not installed (pip install -e '.[bench]')")
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import read_dataset, write_dataset

    data = tmp_path / "data"
    write_dataset(generate(SynthConfig(users=60)), data)
    out = tmp_path / "peer.json"
    cmd = [sys.executable, "bench/peer_bench.py", "--data", str(data), "--threads", "1", "--epochs", "2"]
    cmd += ["--seeds", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"star", "dcn_v2", "deepfm"}  # no --knowledge: LLM4MSR STAR is left out, and it says so
    assert "LLM4MSR STAR left out" in proc.stderr
    for name, row in rows.items():
        assert row["seeds"] == 2 and 0.0 <= row["test_auc"]["mean"] <= 1.0, (name, row)
        assert math.isfinite(row["test_logloss"]["mean"]) and row["samples_per_s"] > 0 and row["wall_s"] > 0
        assert 1 <= row["epochs"] <= 2
        # Scored per scenario under the dataset's scenario names (not the baselines' integer codes).
        assert set(row["scenario_auc"]) == set(read_dataset(data).scenario_names), (name, row["scenario_auc"])
    assert "| dcn_v2 |" in proc.stdout and "| star |" in proc.stdout
