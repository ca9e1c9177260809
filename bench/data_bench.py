"""Dataset benchmark: import + split + labels/negative sampling of the shared datasets, seconds and peak memory.

Each repetition runs in a fresh subprocess so that peak RSS is that of one pipeline run.
Usage: python bench/data_bench.py [--data ../shared/data] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"ml-latest-small": "movielens", "amazon-arts-office": "folder"}  # folder -> importer name


def run_once(path: str, kind: str) -> dict:
    """Child process: import, split with labels and negatives; report seconds and peak RSS."""
    sys.path.insert(0, str(REPO))
    from offline.data.importers import importer_spec
    from offline.data.split import make_split

    start = time.perf_counter()
    spec = importer_spec(kind)
    dataset = spec.load(spec.options_class(path=path))
    imported = time.perf_counter()
    split = make_split(dataset)
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "split_s": done - imported,
        "total_s": done - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": sum(len(f) for f in split.frames().values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write results as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(*args.child)))
        return 0
    data = Path(args.data)
    if not data.is_dir():
        print(f"no datasets at {data}", file=sys.stderr)
        return 1
    results = {}
    for name, kind in DATASETS.items():
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(data / name), kind],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[name] = {
            "rows": runs[0]["rows"],
            **{k: statistics.median(r[k] for r in runs) for k in ("import_s", "split_s", "total_s", "peak_rss_mib")},
            "runs": runs,
        }
    print(f"{'dataset':<22}{'rows':>11}{'import s':>10}{'split s':>9}{'total s':>9}{'peak MiB':>10}")
    for name, r in results.items():
        print(
            f"{name:<22}{r['rows']:>11,}{r['import_s']:>10.2f}{r['split_s']:>9.2f}{r['total_s']:>9.2f}"
            f"{r['peak_rss_mib']:>10.0f}"
        )
    print(f"(median of {args.repeats} runs, each in a fresh process; split includes labels and negative sampling)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
