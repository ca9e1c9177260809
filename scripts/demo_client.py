"""Demo client: waits for the ranker, ranks a sample user's candidates, prints titles and the LLM's explanation."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_ready(base: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if call(f"{base}/readyz").get("ready"):
                return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"ranker at {base} not ready after {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", required=True, help="dataset folder (for titles and a sample user)")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    wait_ready(args.url)
    data = Path(args.data)
    items = pd.read_csv(data / "items.csv", dtype=str, keep_default_na=False)
    inter = pd.read_csv(data / "interactions.csv", dtype=str, keep_default_na=False)
    user = inter["user_id"].iloc[0]
    history = inter[(inter["user_id"] == user) & (inter.get("label", "1") == "1")]
    scenario = history["scenario"].value_counts().index[-1]  # the user's least active scenario
    seen = set(inter.loc[inter["user_id"] == user, "item_id"])
    pool = items[(items["scenario"] == scenario) & ~items["item_id"].isin(seen)]
    titles = items.set_index("item_id")["title"]
    ranked = call(
        f"{args.url}/rank",
        {
            "user_id": user,
            "scenario": scenario,
            "candidates": [{"item_id": i} for i in pool["item_id"]],
            "top_k": args.top_k,
        },
    )
    print(f"\nuser {user} liked, most recent last:")
    for _, row in history.tail(8).iterrows():
        print(f"  [{row['scenario']}] {titles[row['item_id']]}")
    print(
        f"\ntop {args.top_k} of {len(pool)} unseen '{scenario}' items (model {ranked['model_version']}, "
        f"knowledge {ranked['knowledge_version']}):"
    )
    for it in ranked["items"]:
        print(f"  {it['score']:.3f}  {titles[it['item_id']]}")
    if ranked["fallbacks"]:
        print(f"fallbacks: {ranked['fallbacks']}")
    explain = call(f"{args.url}/explain/{user}?scenario={scenario}")
    print(f"\nLLM user-level answer for {user}:\n  {explain['user_answer'] or '(encode mode: no answer text)'}")
    for name, answer in explain["scenario_answers"].items():
        print(f"LLM scenario-level answer for '{name}':\n  {answer or '(encode mode: no answer text)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
