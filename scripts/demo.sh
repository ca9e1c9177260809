#!/usr/bin/env bash
# The main job end to end on the embedded defaults: synthetic data -> dataset folder -> split -> stats.
# Later stages (knowledge, training, serving) append their steps here.
set -euo pipefail
OUT=${1:-demo}
mkdir -p "$OUT"
echo "== 1. synthetic multi-scenario dataset"
llm4msr data synth --out "$OUT/data" --overwrite
echo "== 2. validate and describe"
llm4msr data validate "$OUT/data"
llm4msr data stats "$OUT/data"
echo "== 3. chronological split with labels"
llm4msr data split "$OUT/data" --out "$OUT/split" --overwrite
