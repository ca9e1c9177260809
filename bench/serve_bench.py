"""End-to-end latency of the ranking service over loopback HTTP, and of the design the paper avoids.

What it does:
1. builds a synthetic world (dataset, split, a knowledge snapshot with seeded vectors of SmolLM2's hidden size
   576 unless --dim says otherwise, a plain STAR backbone and an LLM4MSR-STAR model using the scenario, user and
   item levels), or uses --artifact-plain/--artifact-llm/--knowledge given on the command line;
2. for each model: starts `llm4msr serve` as a subprocess, then drives POST /rank from separate load-generator
   processes (one per concurrent client, persistent connection, TCP_NODELAY, each request in one write), for every
   (candidates, clients) cell, bounded by --requests per client and --duration seconds;
3. answers the same request by running the embedded LLM (SmolLM2-135M) at request time: the user prompt is built
   from the user's history and embedded (encode mode; and with --llm-generate, generated then embedded, the paper's
   mode), then the same model scores the candidates;
4. prints p50/p95/p99 latency and requests/s per cell side by side, the LLM4MSR/plain p99 ratio and the
   request-time-LLM/LLM4MSR p50 ratio; --json OUT writes everything, --plots DIR writes PNG latency plots.

Example: python bench/serve_bench.py --json /tmp/serve_bench.json --plots /tmp/serve_plots
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------------------
# Load generator (runs in its own processes)


class HTTPConn:
    """A minimal keep-alive HTTP/1.1 client: one sendall per request, TCP_NODELAY (no Nagle/delayed-ACK stalls)."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buf = rest[length:]
        return status, rest[:length]

    def close(self) -> None:
        self.sock.close()


def _client(port: int, bodies: list[bytes], requests: int, warmup: int, duration: float, barrier, out):
    """One concurrent client: warm up, wait for the others, then send requests back to back."""
    conn = HTTPConn("127.0.0.1", port)
    rng = random.Random(os.getpid())
    for _ in range(warmup):
        conn.post("/rank", bodies[rng.randrange(len(bodies))])
    barrier.wait()
    t_start = time.perf_counter()
    deadline = t_start + duration
    lat, starts, statuses = [], [], []
    for _ in range(requests):
        body = bodies[rng.randrange(len(bodies))]
        t0 = time.perf_counter()
        status, _ = conn.post("/rank", body)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        starts.append(t0 - t_start)
        statuses.append(status)
        if t1 > deadline:
            break
    conn.close()
    out.put({"lat": lat, "starts": starts, "statuses": statuses, "elapsed": time.perf_counter() - t_start})


def run_cell(port: int, bodies: list[bytes], clients: int, requests: int, warmup: int, duration: float) -> dict:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, bodies, requests, warmup, duration, barrier, out))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    lat = np.array([x for r in results for x in r["lat"]])
    starts = np.array([x for r in results for x in r["starts"]])
    statuses = [s for r in results for s in r["statuses"]]
    elapsed = max(r["elapsed"] for r in results)
    return {
        "n": int(len(lat)),
        "errors": int(sum(1 for s in statuses if s != 200)),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p95_ms": float(np.percentile(lat, 95) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "mean_ms": float(lat.mean() * 1e3),
        "rps": float(len(lat) / elapsed),
        "latencies_ms": (lat * 1e3).round(4).tolist(),
        "starts_s": starts.round(4).tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# World, server


def build_world(work: Path, users: int, items_per_scenario: int, dim: int, epochs: int) -> dict:
    from tests.fixtures_serving import build_world as build

    t0 = time.perf_counter()
    world = build(work, users=users, dim=dim, epochs=epochs, items_per_scenario=items_per_scenario)
    print(
        f"built synthetic world in {time.perf_counter() - t0:.1f}s: {len(world.users)} users, "
        f"{len(world.items)} items, {len(world.scenarios)} scenarios, knowledge dim {dim}",
        flush=True,
    )
    return {
        "artifacts": world.artifacts,
        "knowledge": world.knowledge_root,
        "users": world.users,
        "items": world.items,
        "scenarios": world.scenarios,
        "data_dir": world.data_dir,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, knowledge: Path | None, log: Path, threads: int) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llm4msr_cli",
        "serve",
        "--artifact",
        str(artifact),
        "--port",
        str(port),
        "--torch-threads",
        str(threads),
        "--max-candidates",
        "5000",
        "--max-body-bytes",
        "10000000",
    ]
    if knowledge is not None:
        cmd += ["--knowledge", str(knowledge)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready: {log.read_text()}")


def make_bodies(users: list[str], items: list[str], scenario: str, n: int, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        cands = rng.sample(items, n)
        body = {
            "user_id": rng.choice(users),
            "scenario": scenario,
            "candidates": [{"item_id": i} for i in cands],
            "top_k": 50,
        }
        out.append(json.dumps(body).encode())
    return out


def stage_means(port: int) -> dict[str, float]:
    """Mean per stage (ms) from the service's own histograms."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    sums, counts = {}, {}
    for line in text.splitlines():
        if line.startswith("llm4msr_rank_stage_seconds_sum"):
            stage = line.split('stage="')[1].split('"')[0]
            sums[stage] = float(line.split()[-1])
        elif line.startswith("llm4msr_rank_stage_seconds_count"):
            stage = line.split('stage="')[1].split('"')[0]
            counts[stage] = float(line.split()[-1])
    return {s: 1e3 * sums[s] / counts[s] for s in sums if counts.get(s)}


# ---------------------------------------------------------------------------------------------------------------
# The request-time LLM baseline


def request_time_llm(
    world: dict, artifact: Path, n_candidates: int, encode_runs: int, generate_runs: int, threads: int
) -> dict:
    """Answers /rank-equivalent requests by running SmolLM2 on the user's history prompt at request time."""
    import torch

    from shared.artifact import load_artifact
    from shared.dataset.folder import read_dataset
    from shared.dataset.split import make_split
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestKnowledge, RequestScorer

    torch.set_num_threads(threads)
    dataset = read_dataset(world["data_dir"])
    split = make_split(dataset)
    snap = KnowledgeSnapshot(world["knowledge"])
    art = load_artifact(artifact)
    scorer = RequestScorer(art)
    dim = art.config.knowledge_dim
    rng = random.Random(5)
    users = rng.sample(world["users"], max(encode_runs, generate_runs))
    try:
        from offline.knowledge.backends import make_backend
        from offline.knowledge.backends.base import BackendConfig
        from offline.knowledge.prompts import user_prompts

        t0 = time.perf_counter()
        backend = make_backend(BackendConfig(backend="hf", threads=threads, batch_size=1, max_new_tokens=96))
        load_s = time.perf_counter() - t0
        prompts = user_prompts(dataset, split, users=users, count_tokens=backend.count_tokens)

        def embed(text: str) -> np.ndarray:
            return backend.embed([text], "mean")[0]

        def generate(text: str) -> str:
            return backend.generate([text])[0]

        how = f"offline.knowledge hf backend ({backend.model_name}, {backend.config.dtype})"
    except ImportError as exc:  # the knowledge package is not there: transformers directly
        print(f"(offline.knowledge backends unavailable: {exc}; using transformers directly)")
        how, embed, generate, prompts, load_s = _plain_transformers(dataset, split, users, threads)

    scen = snap.scenarios().lookup([world["scenarios"][0]])[0][0]
    results = {"how": how, "load_s": round(load_s, 2)}

    def one(user: str, mode: str) -> tuple[float, int]:
        cands = rng.sample(world["items"], n_candidates)
        t0 = time.perf_counter()
        text = prompts[user]
        if mode == "generate":
            text = text + "\n" + generate(text)
        vec = embed(text).astype(np.float32)
        if vec.shape[0] != dim:  # a reduced knowledge space: the model takes dim columns (latency is what counts)
            vec = np.resize(vec, dim)
        items, _ = snap.items().lookup(cands)
        kn = RequestKnowledge(scenario_vec=scen, user_vec=vec, item_vecs=items)
        scorer.score(world["scenarios"][0], user, cands, kn)
        return time.perf_counter() - t0, len(text)

    for mode, runs in (("encode", encode_runs), ("generate", generate_runs)):
        if runs <= 0:
            continue
        one(users[0], mode)  # warm-up
        times = [one(u, mode)[0] for u in users[:runs]]
        results[mode] = {
            "runs": runs,
            "p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3),
            "prompt_chars_mean": float(statistics.mean(len(prompts[u]) for u in users[:runs])),
        }
        print(f"request-time LLM ({mode}): p50 {results[mode]['p50_ms']:.0f} ms over {runs} requests", flush=True)
    return results


def _plain_transformers(dataset, split, users, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.knowledge.models import default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    hist = split.train_positives()
    titles = dataset.items.set_index("item_id")["title"]
    prompts = {}
    for u in users:
        rows = hist[hist["user_id"] == u]
        lines = [f"- [{s}] {titles.get(i, i)}" for i, s in zip(rows["item_id"], rows["scenario"], strict=True)]
        prompts[u] = "A user interacted with these items:\n" + "\n".join(lines[-40:]) + "\nDescribe their interests."

    @torch.inference_mode()
    def embed(text):
        enc = tok(text, return_tensors="pt")
        hidden = lm.model(**enc).last_hidden_state[0].float()
        return hidden.mean(0).numpy()

    @torch.inference_mode()
    def generate(text):
        enc = tok(text, return_tensors="pt")
        out = lm.generate(**enc, max_new_tokens=96, do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return "transformers (SmolLM2-135M, bfloat16)", embed, generate, prompts, load_s


# ---------------------------------------------------------------------------------------------------------------
# Report


def print_table(cells: list[dict]) -> None:
    by = {(c["variant"], c["candidates"], c["clients"]): c for c in cells}
    keys = sorted({(c["candidates"], c["clients"]) for c in cells})
    variants = [v for v in ("plain", "llm4msr") if any(c["variant"] == v for c in cells)]
    head = (
        f"{'cands':>5} {'clients':>7} | "
        + " | ".join(f"{v:^38}" for v in variants)
        + (" | p99 ratio" if len(variants) == 2 else "")
    )
    sub = f"{'':>5} {'':>7} | " + " | ".join(
        f"{'p50':>7} {'p95':>7} {'p99':>7} {'req/s':>7} {'err':>5}" for _ in variants
    )
    print(head)
    print(sub + " |  ms, llm4msr/plain" if len(variants) == 2 else sub)
    for n, c in keys:
        parts = []
        for v in variants:
            x = by.get((v, n, c))
            parts.append(
                f"{x['p50_ms']:7.2f} {x['p95_ms']:7.2f} {x['p99_ms']:7.2f} {x['rps']:7.0f} {x['errors']:5d}"
                if x
                else " " * 38
            )
        ratio = ""
        if len(variants) == 2 and by.get(("plain", n, c)) and by.get(("llm4msr", n, c)):
            ratio = f" | {by[('llm4msr', n, c)]['p99_ms'] / by[('plain', n, c)]['p99_ms']:9.2f}"
        print(f"{n:>5} {c:>7} | " + " | ".join(parts) + ratio)


def write_plots(cells: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({(c["candidates"], c["clients"]) for c in cells})
    ncand = sorted({k[0] for k in keys})
    ncli = sorted({k[1] for k in keys})
    by = {(c["variant"], c["candidates"], c["clients"]): c for c in cells}
    colors = {"plain": "tab:blue", "llm4msr": "tab:orange"}
    paths = []

    fig, axes = plt.subplots(len(ncand), len(ncli), figsize=(5 * len(ncli), 3.2 * len(ncand)), squeeze=False)
    for i, n in enumerate(ncand):
        for j, c in enumerate(ncli):
            ax = axes[i][j]
            hi = max((np.percentile(by[(v, n, c)]["latencies_ms"], 99.5) for v in colors if (v, n, c) in by), default=1)
            for v, col in colors.items():
                x = by.get((v, n, c))
                if x:
                    ax.hist(
                        x["latencies_ms"],
                        bins=60,
                        range=(0, hi),
                        alpha=0.55,
                        color=col,
                        label=f"{v} p99 {x['p99_ms']:.1f} ms",
                    )
            ax.set_title(f"{n} candidates, {c} client(s)")
            ax.set_xlabel("latency (ms)")
            ax.legend(fontsize=8)
    fig.suptitle("POST /rank latency over loopback HTTP")
    fig.tight_layout()
    p = out / "latency_hist.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(len(ncand), len(ncli), figsize=(5 * len(ncli), 3.2 * len(ncand)), squeeze=False)
    for i, n in enumerate(ncand):
        for j, c in enumerate(ncli):
            ax = axes[i][j]
            for v, col in colors.items():
                x = by.get((v, n, c))
                if not x:
                    continue
                starts = np.array(x["starts_s"])
                lat = np.array(x["latencies_ms"])
                edges = np.arange(0, starts.max() + 0.5, 0.5)
                mids, p50, p99 = [], [], []
                for a, b in zip(edges[:-1], edges[1:], strict=True):
                    sel = lat[(starts >= a) & (starts < b)]
                    if len(sel) >= 5:
                        mids.append((a + b) / 2)
                        p50.append(np.percentile(sel, 50))
                        p99.append(np.percentile(sel, 99))
                ax.plot(mids, p50, color=col, label=f"{v} p50")
                ax.plot(mids, p99, color=col, linestyle="--", label=f"{v} p99")
            ax.set_title(f"{n} candidates, {c} client(s)")
            ax.set_xlabel("time (s), 0.5 s windows")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
    fig.suptitle("POST /rank latency percentiles over time")
    fig.tight_layout()
    p = out / "latency_over_time.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="100,500,1000", help="comma-separated candidate counts")
    ap.add_argument("--clients", default="1,4", help="comma-separated concurrent client counts")
    ap.add_argument("--requests", type=int, default=600, help="requests per client per cell (upper bound)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per cell (upper bound)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured requests per client per cell")
    ap.add_argument("--variants", default="plain,llm4msr")
    ap.add_argument("--users", type=int, default=300, help="synthetic world: users")
    ap.add_argument("--items-per-scenario", type=int, default=400, help="synthetic world: items per scenario")
    ap.add_argument("--dim", type=int, default=576, help="synthetic knowledge dimension (SmolLM2 hidden size)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--artifact-plain", help="use this plain artifact instead of the synthetic one")
    ap.add_argument("--artifact-llm", help="use this LLM4MSR artifact instead of the synthetic one")
    ap.add_argument("--knowledge", help="knowledge snapshot for --artifact-llm")
    ap.add_argument("--torch-threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--llm-encode", type=int, default=5, help="request-time LLM requests, encode mode (0 = skip)")
    ap.add_argument("--llm-generate", type=int, default=2, help="request-time LLM requests, generate mode")
    ap.add_argument("--llm-candidates", type=int, default=500)
    ap.add_argument("--work", help="working folder (default: a temp dir)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plots", help="write PNG plots into this folder")
    args = ap.parse_args(argv)

    cands = [int(x) for x in args.candidates.split(",")]
    clients = [int(x) for x in args.clients.split(",")]
    variants = args.variants.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    world = build_world(work / "world", args.users, args.items_per_scenario, args.dim, args.epochs)
    artifacts = dict(world["artifacts"])
    knowledge = world["knowledge"]
    if args.artifact_plain:
        artifacts["plain"] = Path(args.artifact_plain)
    if args.artifact_llm:
        artifacts["llm4msr"] = Path(args.artifact_llm)
        knowledge = Path(args.knowledge) if args.knowledge else knowledge

    scenario = world["scenarios"][0]
    bodies = {n: make_bodies(world["users"], world["items"], scenario, n, 64, seed=n) for n in cands}
    cells, stages = [], {}
    for v in variants:
        proc, port = start_server(
            artifacts[v], knowledge if v != "plain" else None, work / f"server-{v}.log", args.torch_threads
        )
        try:
            for n in cands:
                for c in clients:
                    cell = run_cell(port, bodies[n], c, args.requests, args.warmup, args.duration)
                    cell.update(variant=v, candidates=n, clients=c)
                    cells.append(cell)
                    print(
                        f"{v:8s} {n:5d} cands {c} clients: p50 {cell['p50_ms']:.2f} p99 {cell['p99_ms']:.2f} ms, "
                        f"{cell['rps']:.0f} req/s, {cell['errors']} errors",
                        flush=True,
                    )
            stages[v] = stage_means(port)
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    llm = None
    if args.llm_encode > 0 or args.llm_generate > 0:
        llm = request_time_llm(
            world,
            artifacts["llm4msr"] if "llm4msr" in artifacts else artifacts[variants[0]],
            args.llm_candidates,
            args.llm_encode,
            args.llm_generate,
            threads=2,
        )

    print()
    print(
        f"POST /rank over loopback HTTP, latency in ms ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, server torch threads {args.torch_threads})"
    )
    print_table(cells)
    for v, st in stages.items():
        print(f"{v} mean stage times (ms, all cells): " + ", ".join(f"{k} {x:.3f}" for k, x in st.items()))
    summary = {}
    ref = {(c["variant"], c["candidates"], c["clients"]): c for c in cells}
    if ("llm4msr", 500, 4) in ref:
        summary["llm4msr_500x4_p99_ms"] = ref[("llm4msr", 500, 4)]["p99_ms"]
    if ("llm4msr", 500, 4) in ref and ("plain", 500, 4) in ref:
        summary["p99_ratio_llm4msr_over_plain_500x4"] = (
            ref[("llm4msr", 500, 4)]["p99_ms"] / ref[("plain", 500, 4)]["p99_ms"]
        )
    if llm is not None:
        base = ref.get(("llm4msr", args.llm_candidates, 1))
        print(f"request-time LLM via {llm['how']} (model load {llm['load_s']} s, not counted):")
        for mode in ("encode", "generate"):
            if mode in llm:
                line = f"  {mode:8s} p50 {llm[mode]['p50_ms']:9.1f} ms over {llm[mode]['runs']} requests"
                if base:
                    ratio = llm[mode]["p50_ms"] / base["p50_ms"]
                    summary[f"llm_{mode}_p50_over_llm4msr_p50"] = ratio
                    line += f"  = {ratio:.0f}x the cached-knowledge LLM4MSR p50 ({base['p50_ms']:.2f} ms, 1 client)"
                print(line)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    if args.plots:
        for p in write_plots(cells, Path(args.plots)):
            print(f"plot: {p}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "cells": cells,
                    "stages_ms": stages,
                    "request_time_llm": llm,
                    "summary": summary,
                },
                indent=1,
            )
        )
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
