"""bench/knowledge_bench.py's side-by-side comparisons on a tiny random model: prefix reuse on/off and the --dtype
default against an old dtype run in one process, report a rate for both settings and vectors that agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures_llm import tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_bench_compares_dtype_and_prefix_reuse_side_by_side(tmp_path, synth_dir, tiny_model):  # noqa: F811
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/knowledge_bench.py", "--backends", "hf", "--no-phases", "--no-incremental"]
    cmd += ["--data", str(synth_dir), "--model", str(tiny_model), "--dtype", "float32", "--threads", "1"]
    cmd += ["--users", "4", "--gen-users", "0", "--rounds", "2", "--compare-prefix", "--compare-dtype", "bfloat16"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    (dtype_row,) = result["compare_dtype"]
    assert dtype_row["dtypes"] == {"new": "float32", "old": "bfloat16"}
    assert dtype_row["texts"] == 4 and all(len(v) == 2 for v in dtype_row["rounds_s"].values())
    assert all(rate > 0 for rate in dtype_row["per_s"].values())
    assert 0.99 < dtype_row["min_cosine"] <= 1.0 + 1e-6  # bf16 rounding only: the same space
    (prefix_row,) = result["compare_prefix"]
    assert prefix_row["min_cosine"] > 0.9999 and prefix_row["prefix_reused_share"] > 0
    assert "float32 vs bfloat16" in proc.stdout and "shared-prefix reuse on vs off" in proc.stdout
    # The same dtype twice is not a comparison: refused with a message naming it.
    same = subprocess.run(cmd[:-2] + ["--compare-dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert same.returncode != 0 and "--compare-dtype float32" in same.stderr
