r"""End-to-end latency of the ranking service over loopback HTTP, with 1 and N worker processes side by side, and
of the design the paper avoids.

What it does:
1. builds a synthetic world (dataset, split, a knowledge snapshot with seeded 256-d vectors, the space a knowledge
   build reduces SmolLM2's 576-d vectors to by default on data of production size; --dim 576 for an unreduced
   space) and trains three STAR models on it: `plain` (the backbone alone), `llm4msr`
   (the paper's scenario- and user-level meta layers) and `llm4msr-item` (plus the item level); or uses
   --artifact-plain/--artifact-llm/--knowledge given on the command line;
2. starts one `llm4msr serve` subprocess per model and worker count (--workers, default 1 and the usable cores)
   and drives POST /rank from separate load-generator processes (one per concurrent client, persistent
   connection, TCP_NODELAY, each request in one write) for every (candidates, clients) cell (--cells, or
   --candidates x --clients), alternating between the servers in --rounds short rounds so that background load on
   a shared machine affects them alike; bounded by --requests per client and --duration seconds per cell and server;
3. with --memory, measures the resident memory (RSS, PSS, private) of the LLM4MSR server with 1, 2, 4 workers
   (--memory-workers) on a snapshot of amazon-arts-office's size (9,577 users, 38,396 items, dim --dim), whose
   vectors the workers share through memory-mapped files;
4. answers the same request by running the embedded LLM (SmolLM2-135M) at request time: the user prompt is built
   from the user's history and embedded (encode mode; and with --llm-generate, generated then embedded, the paper's
   mode), then the same model scores the candidates;
5. prints p50/p95/p99 latency and requests/s per cell side by side, the LLM4MSR/plain p99 ratios, N-worker over
   1-worker throughput and the request-time-LLM/LLM4MSR p50 ratio; per cell and server also the CPU time per
   request of the server's processes and of the load generator, the cores they kept busy, how the clients'
   keep-alive connections fell on the workers (2+2, 3+1) in each round, and the N-worker throughput ceiling
   those CPU costs allow when the load generator shares the server's cores; --json OUT writes everything,
   --plots DIR writes PNG latency plots.

The issue-16 comparison (old = --workers 1, new = the cores), as one run:
    python bench/serve_bench.py --cells 500x4,100x1,500x1 --variants plain,llm4msr --workers 1,2 --memory \
        --llm-encode 0 --llm-generate 0 --json /tmp/serve_bench.json
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import random
import resource
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
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
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


def own_cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_pids(pid: int) -> list[int]:
    """The live children of a process (none once it has ended)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (a server: the parent and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # a process that ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        todo += child_pids(p)
    return total


def _client(port: int, bodies: list[bytes], requests: int, warmup: int, duration: float, barrier, out):
    """One concurrent client: warm up, wait for the others, then send requests back to back."""
    conn = HTTPConn("127.0.0.1", port)
    status, ready = conn.request("GET", "/readyz")  # which worker holds this connection (keep-alive: all of it)
    worker = json.loads(ready).get("worker_pid", 0) if status == 200 else 0
    rng = random.Random(os.getpid())
    for _ in range(warmup):
        conn.post("/rank", bodies[rng.randrange(len(bodies))])
    barrier.wait()
    cpu_start = own_cpu_seconds()
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
    elapsed, cpu = time.perf_counter() - t_start, own_cpu_seconds() - cpu_start
    conn.close()
    out.put({"lat": lat, "starts": starts, "statuses": statuses, "elapsed": elapsed, "cpu_s": cpu, "worker": worker})


def run_cell(
    port: int, bodies: list[bytes], clients: int, requests: int, warmup: int, duration: float, server_pid: int = 0
) -> dict:
    """One round of a cell; with server_pid, also the CPU time the server's processes and the load generator's
    spent in the measured part (warm-up excluded): on a machine whose cores both share, the load generator's
    share bounds what more workers can gain."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients + 1)  # the clients and this process: the server's CPU is read at the start
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, bodies, requests, warmup, duration, barrier, out))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=duration + 120)
    server_start = tree_cpu_seconds(server_pid) if server_pid else 0.0
    results = [out.get(timeout=duration + 120) for _ in procs]
    server_cpu = tree_cpu_seconds(server_pid) - server_start if server_pid else 0.0
    for p in procs:
        p.join(timeout=10)
    return {
        "lat": [x for r in results for x in r["lat"]],
        "starts": [x for r in results for x in r["starts"]],
        "errors": sum(1 for r in results for s in r["statuses"] if s != 200),
        "elapsed": max(r["elapsed"] for r in results),
        "server_cpu_s": server_cpu,
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "split": connection_split([r["worker"] for r in results]),
    }


def connection_split(workers: list[int]) -> str:
    """How the clients' connections fell on the server's workers, most loaded first: "2+2", "3+1", "4"."""
    counts = sorted(collections.Counter(workers).values(), reverse=True)
    return "+".join(str(c) for c in counts)


def summarize(parts: list[dict]) -> dict:
    """Pools the rounds of one cell (start times laid end to end)."""
    lat, starts, offset = [], [], 0.0
    for part in parts:
        lat.extend(part["lat"])
        starts.extend(s + offset for s in part["starts"])
        offset += part["elapsed"]
    arr = np.array(lat)
    server_cpu = sum(p.get("server_cpu_s", 0.0) for p in parts)
    client_cpu = sum(p.get("client_cpu_s", 0.0) for p in parts)
    return {
        "n": int(len(arr)),
        "errors": int(sum(p["errors"] for p in parts)),
        "server_cpu_ms_per_request": server_cpu / len(arr) * 1e3,
        "client_cpu_ms_per_request": client_cpu / len(arr) * 1e3,
        "cores_busy": (server_cpu + client_cpu) / offset,
        "splits": [p.get("split", "") for p in parts],
        "p50_ms": float(np.percentile(arr, 50) * 1e3),
        "p95_ms": float(np.percentile(arr, 95) * 1e3),
        "p99_ms": float(np.percentile(arr, 99) * 1e3),
        "mean_ms": float(arr.mean() * 1e3),
        "rps": float(len(arr) / offset),
        "latencies_ms": (arr * 1e3).round(4).tolist(),
        "starts_s": np.array(starts).round(4).tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# World, server


def build_world(work: Path, users: int, items_per_scenario: int, dim: int, epochs: int, variants: list[str]) -> dict:
    import shutil

    from tests.fixtures_serving import build_world as build

    shutil.rmtree(work, ignore_errors=True)  # a fresh world each run (artifact formats change with the code)
    t0 = time.perf_counter()
    world = build(work, users=users, dim=dim, epochs=epochs, items_per_scenario=items_per_scenario, variants=variants)
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


def start_server(
    artifact: Path, knowledge: Path | None, log: Path, threads: int, workers: int = 1, env: dict | None = None
) -> tuple[subprocess.Popen, int]:
    """`llm4msr serve` with `workers` processes, returned once every worker answers /readyz."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llm4msr_cli", "serve", "--artifact", str(artifact), "--port", str(port),
        "--torch-threads", str(threads), "--max-candidates", "5000", "--max-body-bytes", "10000000",
        "--workers", str(workers),
    ]  # fmt: skip
    if knowledge is not None:
        cmd += ["--knowledge", str(knowledge)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120 + 60 * workers
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        if len(ready_workers(port)) >= workers:
            return proc, port
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready: {log.read_text()}")


def ready_workers(port: int, tries: int = 12) -> set[int]:
    """Pids of the workers that answer /readyz 200 on new connections (any accepting worker may take one)."""
    import httpx

    pids = set()
    for _ in range(tries):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            if r.status_code == 200:
                pids.add(r.json()["worker_pid"])
        except httpx.HTTPError:
            return pids
    return pids


def process_tree_memory(pid: int) -> dict:
    """Resident memory of a server (MiB): the parent and each worker process (RSS counts shared pages in full,
    PSS splits them between the processes that map them, private = pages no other process maps)."""

    def one(p: int) -> dict:
        fields = {}
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        return {"pid": p, "rss_mb": fields["Rss"], "pss_mb": fields["Pss"], "private_mb": private}

    workers = [c for c in child_pids(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    procs = [one(pid)] + [one(c) for c in workers]
    return {
        "processes": procs,
        "rss_mb": sum(x["rss_mb"] for x in procs),
        "pss_mb": sum(x["pss_mb"] for x in procs),
    }


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

    from offline.data.split import make_split
    from shared.artifact import load_artifact
    from shared.dataset.folder import read_dataset
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
        cands = rng.sample(world["items"], min(n_candidates, len(world["items"])))
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


def series(cell: dict) -> str:
    """A server's name in the tables: model variant and worker processes."""
    return f"{cell['variant']} w{cell['workers']}"


def print_table(cells: list[dict]) -> None:
    by = {(series(c), c["candidates"], c["clients"]): c for c in cells}
    keys = sorted({(c["candidates"], c["clients"]) for c in cells})
    names = list(dict.fromkeys(series(c) for c in cells))
    ratios = [(n, n.replace(n.split()[0], "plain", 1)) for n in names if not n.startswith("plain")]
    ratios = [(n, base) for n, base in ratios if base in names]
    width = 31
    print(f"{'cands':>5} {'clients':>7} | " + " | ".join(f"{n:^{width}}" for n in names)
          + "".join(f" | p99 {n}/plain" for n, _ in ratios))  # fmt: skip
    print(
        f"{'':>5} {'':>7} | " + " | ".join(f"{'p50':>6} {'p95':>6} {'p99':>6} {'req/s':>6} {'err':>3}" for _ in names)
    )
    for n, c in keys:
        parts = []
        for name in names:
            x = by.get((name, n, c))
            parts.append(
                f"{x['p50_ms']:6.2f} {x['p95_ms']:6.2f} {x['p99_ms']:6.2f} {x['rps']:6.0f} {x['errors']:3d}"
                if x
                else " " * width
            )
        line = f"{n:>5} {c:>7} | " + " | ".join(parts)
        for name, base in ratios:
            if by.get((base, n, c)) and by.get((name, n, c)):
                line += f" | {by[(name, n, c)]['p99_ms'] / by[(base, n, c)]['p99_ms']:{len(name) + 10}.2f}"
        print(line)


def print_cpu(cells: list[dict]) -> None:
    print("\nCPU time per request (ms) in the measured part of each cell, and the cores it kept busy:")
    print(f"{'server':>14} {'cands':>5} {'clients':>7} | {'server':>7} {'load gen':>8} | {'cores busy':>10} | "
          "connections per worker, each round")  # fmt: skip
    for c in sorted(cells, key=lambda c: (c["candidates"], c["clients"])):
        print(f"{series(c):>14} {c['candidates']:5d} {c['clients']:7d} | {c['server_cpu_ms_per_request']:7.3f} "
              f"{c['client_cpu_ms_per_request']:8.3f} | {c['cores_busy']:10.2f} | {' '.join(c['splits'])}")  # fmt: skip


def print_memory(rows: list[dict]) -> None:
    print("\nresident memory (MiB) of llm4msr servers with amazon-arts-office-sized snapshot knowledge:")
    print(f"{'workers':>7} | {'RSS all':>8} {'PSS all':>8} | {'parent PSS':>10} | {'worker RSS':>10} {'PSS':>6} "
          f"{'private':>7} | {'PSS added per worker':>20}")  # fmt: skip
    prev = None
    for r in rows:
        workers = r["processes"][1:] or r["processes"]
        mean = {k: statistics.mean(w[k] for w in workers) for k in ("rss_mb", "pss_mb", "private_mb")}
        parent = r["processes"][0]["pss_mb"] if len(r["processes"]) > 1 else 0.0
        added = ""
        if prev is not None:
            added = f"{(r['pss_mb'] - prev['pss_mb']) / (r['workers'] - prev['workers']):20.1f}"
        print(f"{r['workers']:>7} | {r['rss_mb']:8.1f} {r['pss_mb']:8.1f} | {parent:10.1f} | {mean['rss_mb']:10.1f} "
              f"{mean['pss_mb']:6.1f} {mean['private_mb']:7.1f} | {added}")  # fmt: skip
        prev = r


def write_plots(cells: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({(c["candidates"], c["clients"]) for c in cells})
    ncand = sorted({k[0] for k in keys})
    ncli = sorted({k[1] for k in keys})
    by = {(series(c), c["candidates"], c["clients"]): c for c in cells}
    names = list(dict.fromkeys(series(c) for c in cells))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    paths = []

    fig, axes = plt.subplots(len(ncand), len(ncli), figsize=(5 * len(ncli), 3.2 * len(ncand)), squeeze=False)
    for i, n in enumerate(ncand):
        for j, c in enumerate(ncli):
            ax = axes[i][j]
            hi = max((np.percentile(by[(v, n, c)]["latencies_ms"], 99.5) for v in names if (v, n, c) in by), default=1)
            for v, col in colors.items():
                x = by.get((v, n, c))
                if x:
                    label = f"{v} p99 {x['p99_ms']:.1f} ms"
                    ax.hist(x["latencies_ms"], bins=60, range=(0, hi), alpha=0.55, color=col, label=label)
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
                if x:
                    _plot_over_time(ax, x, v, col)
            ax.set_title(f"{n} candidates, {c} client(s)")
            ax.set_xlabel("time since start of the cell (s), ~20 windows")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
    fig.suptitle("POST /rank latency percentiles over time")
    fig.tight_layout()
    p = out / "latency_over_time.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    return paths


def _plot_over_time(ax, cell: dict, name: str, color: str) -> None:
    starts = np.array(cell["starts_s"])
    lat = np.array(cell["latencies_ms"])
    step = max(starts.max() / 20, 0.05)  # ~20 windows per cell
    edges = np.arange(0, starts.max() + step, step)
    mids, p50, p99 = [], [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        sel = lat[(starts >= a) & (starts < b)]
        if len(sel) >= 5:
            mids.append((a + b) / 2)
            p50.append(np.percentile(sel, 50))
            p99.append(np.percentile(sel, 99))
    ax.plot(mids, p50, color=color, marker=".", label=f"{name} p50")
    ax.plot(mids, p99, color=color, marker=".", linestyle="--", label=f"{name} p99")


# ---------------------------------------------------------------------------------------------------------------
# Runs


# What a variant's suffix (llm4msr@inline) sets in its server's environment.
VARIANT_ENV = {
    "inline": {"LLM4MSR_RANK_EXECUTOR": "inline"},
    "thread": {"LLM4MSR_RANK_EXECUTOR": "thread"},
    "eager": {"LLM4MSR_TRACED_FORWARD": "false"},
    "routed": {"LLM4MSR_RANK_FAST_PATH": "false"},
}


def parse_cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(candidates, clients) per cell: --cells 500x4,100x1, else every --candidates x --clients."""
    if args.cells:
        return [(int(n), int(c)) for n, c in (cell.split("x") for cell in args.cells.split(","))]
    return [(int(n), int(c)) for n in args.candidates.split(",") for c in args.clients.split(",")]


def measure_cells(servers: dict, bodies: dict, cells: list[tuple[int, int]], args: argparse.Namespace) -> list[dict]:
    """Every cell on every server, alternating between the servers in --rounds short rounds, so that background
    load on a shared machine hits them alike (fair ratios)."""
    out = []
    names = list(servers)
    for n, c in cells:
        parts: dict[tuple, list[dict]] = {k: [] for k in names}
        for r in range(args.rounds):
            for key in names[r % len(names) :] + names[: r % len(names)]:
                requests, duration = max(1, args.requests // args.rounds), args.duration / args.rounds
                proc, port = servers[key]
                parts[key].append(run_cell(port, bodies[n], c, requests, args.warmup, duration, proc.pid))
        for variant, workers in names:
            cell = summarize(parts[(variant, workers)])
            cell.update(variant=variant, workers=workers, candidates=n, clients=c)
            out.append(cell)
            print(
                f"{series(cell):14s} {n:5d} cands {c} clients: p50 {cell['p50_ms']:.2f} p99 {cell['p99_ms']:.2f} "
                f"ms, {cell['rps']:.0f} req/s, {cell['errors']} errors",
                flush=True,
            )
    return out


def measure_memory(world: dict, artifact: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Resident memory of the LLM4MSR server per worker count, on a snapshot of amazon-arts-office's size
    (--memory-users x --memory-items vectors of --dim) in the model's knowledge space."""
    from online.knowledge import SnapshotKnowledgeStore
    from tests.fixtures_serving import make_space, write_snapshot

    users = [f"mu{i}" for i in range(args.memory_users)] + list(world["users"])
    items = [f"mi{i}" for i in range(args.memory_items)] + list(world["items"])
    root = work / "memory-knowledge"
    write_snapshot(root, "big", world["scenarios"], users, items, make_space(args.dim), seed=7)
    cache = work / "knowledge-cache"
    SnapshotKnowledgeStore(root, None, cache_dir=cache).load_published()  # converted once, as a deployment would
    env = {"LLM4MSR_KNOWLEDGE_CACHE_DIR": str(cache)}
    rows = []
    bodies = make_bodies(world["users"], world["items"], world["scenarios"][0], 100, 8, seed=1)
    for workers in sorted({int(w) for w in args.memory_workers.split(",")}):
        proc, port = start_server(artifact, root, work / f"memory-{workers}.log", args.torch_threads, workers, env)
        try:
            run_cell(port, bodies, max(1, workers), 20, 5, 5.0)  # every worker has served requests
            row = process_tree_memory(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        row["workers"] = workers
        rows.append(row)
        print(f"memory, {workers} workers: RSS {row['rss_mb']:.0f} MiB, PSS {row['pss_mb']:.0f} MiB", flush=True)
    return rows


def summary_of(cells: list[dict]) -> dict:
    """The issue's criteria: per worker count, LLM4MSR p99 and throughput at 500 x 4, p50 at 100 x 1, the
    LLM4MSR/plain p99 at 500 candidates; and throughput of N workers over 1."""
    ref = {(c["variant"], c["workers"], c["candidates"], c["clients"]): c for c in cells}
    out = {}
    for (variant, workers, n, c), cell in ref.items():
        if variant != "llm4msr":
            continue
        tag = f"w{workers}_{n}x{c}"
        out[f"llm4msr_{tag}_p50_ms"] = cell["p50_ms"]
        out[f"llm4msr_{tag}_p99_ms"] = cell["p99_ms"]
        out[f"llm4msr_{tag}_rps"] = cell["rps"]
        plain = ref.get(("plain", workers, n, c))
        if plain is not None and n == 500:
            out[f"p99_ratio_llm4msr_over_plain_{tag}"] = cell["p99_ms"] / plain["p99_ms"]
        one = ref.get((variant, 1, n, c))
        if workers > 1 and one is not None:
            out[f"rps_ratio_llm4msr_w{workers}_over_w1_{n}x{c}"] = cell["rps"] / one["rps"]
            out[f"rps_ceiling_llm4msr_w{workers}_over_w1_{n}x{c}"] = scaling_ceiling(cell, workers) / one["rps"]
    return out


def scaling_ceiling(cell: dict, workers: int) -> float:
    """The most requests/s `workers` servers can answer on this machine at the cell's measured CPU cost per
    request, when the load generator runs on the same cores: all usable cores busy with the server's and the
    generator's work, and no worker using more than one core (one torch thread)."""
    from online.settings import usable_cores

    server, client = cell["server_cpu_ms_per_request"], cell["client_cpu_ms_per_request"]
    cores = usable_cores()
    if server <= 0:
        return float("nan")
    return 1e3 * min(cores / (server + client), min(workers, cores) / server)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from online.settings import usable_cores

    cores = usable_cores()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="100,500,1000", help="comma-separated candidate counts")
    ap.add_argument("--clients", default="1,4", help="comma-separated concurrent client counts")
    ap.add_argument("--cells", help="exact cells instead of candidates x clients, e.g. 500x4,100x1")
    ap.add_argument(
        "--workers",
        default="1" if cores == 1 else f"1,{cores}",
        help=f"comma-separated worker counts, each a server per variant (default 1 and the usable cores, {cores})",
    )
    ap.add_argument("--requests", type=int, default=900, help="requests per client per cell and variant (bound)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per cell and variant (upper bound)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured requests per client per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternations between the servers per cell")
    ap.add_argument(
        "--variants",
        default="plain,llm4msr,llm4msr-item",
        help="plain = STAR alone; llm4msr = STAR + scenario and user knowledge (the paper); llm4msr-item = + item level; "
        "a suffix @inline or @thread serves that model with LLM4MSR_RANK_EXECUTOR set so instead of auto "
        "(e.g. llm4msr,llm4msr@thread), "
        "@eager with the eager forward instead of the traced graphs (LLM4MSR_TRACED_FORWARD=false), @routed with "
        "POST /rank through the framework's routing instead of the fast path (LLM4MSR_RANK_FAST_PATH=false); "
        "suffixes combine (llm4msr@thread@routed)",
    )
    ap.add_argument("--users", type=int, default=300, help="synthetic world: users")
    ap.add_argument("--items-per-scenario", type=int, default=400, help="synthetic world: items per scenario")
    ap.add_argument(
        "--dim",
        type=int,
        default=256,
        help="synthetic knowledge dimension (256: the default reduced space; 576: SmolLM2's own width)",
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--artifact-plain", help="use this plain artifact instead of the synthetic one")
    ap.add_argument("--artifact-llm", help="use this LLM4MSR artifact instead of the synthetic one")
    ap.add_argument("--knowledge", help="knowledge snapshot for --artifact-llm")
    ap.add_argument("--torch-threads", type=int, default=1, help="server torch threads (per worker)")
    ap.add_argument("--memory", action="store_true", help="also measure resident memory per worker count")
    ap.add_argument("--memory-users", type=int, default=9577, help="users of that snapshot (amazon-arts-office)")
    ap.add_argument("--memory-items", type=int, default=38396, help="items of that snapshot (amazon-arts-office)")
    ap.add_argument("--memory-workers", default="1,2,4", help="worker counts whose memory is measured")
    ap.add_argument("--llm-encode", type=int, default=5, help="request-time LLM requests, encode mode (0 = skip)")
    ap.add_argument("--llm-generate", type=int, default=1, help="request-time LLM requests, generate mode")
    ap.add_argument("--llm-candidates", type=int, default=500)
    ap.add_argument("--llm-threads", type=int, default=1, help="torch threads of the request-time LLM")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="priority change for the bench, its servers and clients (e.g. -10 as root: isolates the measurement "
        "from niced background jobs on a shared machine)",
    )
    ap.add_argument("--work", help="working folder (default: a temp dir)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plots", help="write PNG plots into this folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]  # the machine's other work, before the bench adds its own
    if args.nice:
        os.nice(args.nice)
    cells = parse_cells(args)
    variants = args.variants.split(",")
    if unknown := {x for v in variants for x in v.split("@")[1:]} - set(VARIANT_ENV):
        raise SystemExit(f"unknown variant suffix(es) {sorted(unknown)}; expected one of {sorted(VARIANT_ENV)}")
    models = list(dict.fromkeys(v.split("@")[0] for v in variants))  # llm4msr@inline serves the llm4msr model
    worker_counts = [int(x) for x in args.workers.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    world = build_world(work / "world", args.users, args.items_per_scenario, args.dim, args.epochs, models)
    artifacts = dict(world["artifacts"])
    knowledge = world["knowledge"]
    if args.artifact_plain:
        artifacts["plain"] = Path(args.artifact_plain)
    if args.artifact_llm:
        artifacts["llm4msr"] = Path(args.artifact_llm)
        knowledge = Path(args.knowledge) if args.knowledge else knowledge

    scenario = world["scenarios"][0]
    bodies = {n: make_bodies(world["users"], world["items"], scenario, n, 64, seed=n) for n, _ in cells}
    # All servers run side by side (an idle one costs no CPU).
    servers: dict[tuple[str, int], tuple[subprocess.Popen, int]] = {}
    stages = {}
    try:
        env = {"LLM4MSR_KNOWLEDGE_CACHE_DIR": str(work / "knowledge-cache")}  # memory-mapped copies stay in work
        for v in variants:
            model, *suffixes = v.split("@")  # llm4msr@thread@routed: both settings
            server_env = {**env, **{k: x for suffix in suffixes for k, x in VARIANT_ENV[suffix].items()}}
            for w in worker_counts:
                log = work / f"server-{v}-w{w}.log"
                kn = knowledge if model != "plain" else None
                servers[(v, w)] = start_server(artifacts[model], kn, log, args.torch_threads, w, server_env)
        results = measure_cells(servers, bodies, cells, args)
        for (v, w), (_, port) in servers.items():
            stages[f"{v} w{w}"] = stage_means(port)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    memory = measure_memory(world, artifacts.get("llm4msr", artifacts[models[0]]), work, args) if args.memory else []

    llm = None
    if args.llm_encode > 0 or args.llm_generate > 0:
        llm = request_time_llm(
            world,
            artifacts["llm4msr"] if "llm4msr" in artifacts else artifacts[models[0]],
            args.llm_candidates,
            args.llm_encode,
            args.llm_generate,
            threads=args.llm_threads,
        )
    report(args, results, stages, memory, llm, load_before)
    return 0


def report(args, cells: list[dict], stages: dict, memory: list[dict], llm: dict | None, load_before: float) -> None:
    print()
    print(
        f"POST /rank over loopback HTTP, latency in ms ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, server torch threads {args.torch_threads} per worker, nice {args.nice}, "
        f"1-min load average {load_before:.1f} before the run)"
    )
    print_table(cells)
    print_cpu(cells)
    for name, st in stages.items():
        print(f"{name} mean stage times (ms, all cells): " + ", ".join(f"{k} {x:.3f}" for k, x in st.items()))
    if memory:
        print_memory(memory)
    summary = summary_of(cells)
    if llm is not None:
        base = next((c for c in cells if (c["variant"], c["candidates"], c["clients"]) == ("llm4msr", 500, 1)), None)
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
        doc = {
            "command": " ".join(sys.argv),
            "cells": cells,
            "stages_ms": stages,
            "memory": memory,
            "request_time_llm": llm,
            "summary": summary,
            "load_average_before": load_before,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"json: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
