#!/usr/bin/env bash
# The main job end to end on the embedded defaults:
#   synthetic data -> split -> LLM knowledge (embedded SmolLM2) -> [publish to Redis] -> train STAR + LLM4MSR
#   -> evaluate -> start the ranker -> rank a sample user's candidates and show the LLM's explanation -> stop.
# Environment: DEMO_USERS (default 16), DEMO_MODE (generate|encode, default generate), REDIS_URL (optional:
# publish there and serve from Redis; without it the ranker reads the Parquet snapshot), DEMO_PORT.
set -euo pipefail
OUT=${1:-demo}
USERS=${DEMO_USERS:-16}
MODE=${DEMO_MODE:-generate}
PORT=${DEMO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$OUT"

# Elapsed time of each stage, printed as it ends and summed up at the end.
STAGE_NAMES=()
STAGE_SECONDS=()
STAGE_START=$SECONDS
CURRENT_STAGE=""
stage() {
  if [ -n "$CURRENT_STAGE" ]; then
    local took=$(( SECONDS - STAGE_START ))
    STAGE_NAMES+=("$CURRENT_STAGE")
    STAGE_SECONDS+=("$took")
    echo "   (${took} s)"
  fi
  CURRENT_STAGE="$1"
  STAGE_START=$SECONDS
  [ -n "$1" ] && echo "== $1"
  return 0
}

stage "1. synthetic multi-scenario dataset ($USERS users)"
llm4msr data synth --out "$OUT/data" --users "$USERS" --overwrite
llm4msr data validate "$OUT/data"
llm4msr data stats "$OUT/data"

stage "2. chronological split with labels (exported for other tools)"
llm4msr data split "$OUT/data" --out "$OUT/split" --overwrite

stage "3. LLM knowledge: scenario, user and item embeddings with the embedded SmolLM2 ($MODE mode)"
llm4msr knowledge build --data "$OUT/data" --out "$OUT/knowledge" --mode "$MODE" --max-new-tokens 48
if [ -n "${REDIS_URL:-}" ]; then
  llm4msr knowledge publish "$OUT/knowledge" --redis-url "$REDIS_URL"
  SOURCE=(--redis-url "$REDIS_URL")
else
  echo "(no REDIS_URL: the ranker reads the Parquet snapshot directly)"
  SOURCE=(--knowledge "$OUT/knowledge")
fi

stage "4. train STAR with LLM4MSR (scenario, user and item knowledge) and evaluate on the held-out test split"
llm4msr train --data "$OUT/data" --knowledge "$OUT/knowledge" --backbone star --levels scenario,user,item \
  --out "$OUT/artifact" --overwrite --no-progress
llm4msr evaluate "$OUT/artifact" --data "$OUT/data" --knowledge "$OUT/knowledge"

stage "5. ranking service on 127.0.0.1:$PORT"
llm4msr serve --artifact "$OUT/artifact" "${SOURCE[@]}" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python3 scripts/demo_client.py --url "http://127.0.0.1:$PORT" --data "$OUT/data"
kill $SERVER
wait $SERVER 2>/dev/null || true
trap - EXIT
stage ""
echo "== done in ${SECONDS} s: dataset, split, knowledge, artifact and server log are under $OUT/"
for i in "${!STAGE_NAMES[@]}"; do
  printf '   %5d s  %s\n' "${STAGE_SECONDS[$i]}" "${STAGE_NAMES[$i]}"
done
