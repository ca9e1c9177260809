"""Helpers of the deployment tests: reading the compose file, the dashboards and the alert rules, and running real
processes (the ranker under uvicorn, Prometheus) on loopback ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S = DEPLOY / "k8s"

# Grafana's built-in variables and the dashboard's own, replaced by values Prometheus accepts.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def load_k8s() -> list[dict]:
    docs: list[dict] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def dashboard_exprs(path: Path) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (nested rows too) and query variables."""
    dash = json.loads(path.read_text())
    out: list[str] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append(t["expr"])
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            out.append(q)
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Raw series names an expression reads (llm4msr_* and up); recording rules (llm4msr:...) are not series."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    names = set(re.findall(r"\b(llm4msr_[a-zA-Z0-9_]+)\b", expr))
    names |= {m for m in re.findall(r"\b(up)\s*\{", expr)}
    if "label_values(" in expr:
        names |= set(re.findall(r"label_values\(\s*(llm4msr_[a-zA-Z0-9_]+)", expr))
    return names


def grafana_to_promql(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def wait_http(url: str, timeout: float, ok=(200,)) -> None:
    import httpx

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code in ok:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


class Proc:
    """A child process with its output in a log file; stopped by terminate, then kill."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.args = args
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def llm4msr_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("LLM4MSR_WORKERS", "1")  # a ranker started here has one worker unless a test sets more
    env.update(extra)
    return env


def llm4msr_cmd(*args: str) -> list[str]:
    """The console script as a module run, so an uninstalled checkout works the same."""
    return [sys.executable, "-m", "llm4msr_cli", *args]


def start_ranker(
    artifact: Path,
    tmp: Path,
    *,
    redis_url: str | None = None,
    knowledge: Path | None = None,
    extra_env: dict | None = None,
    timeout: float = 90,
) -> Iterator[tuple[str, Proc]]:
    """`llm4msr serve` on a free loopback port (real uvicorn), yielded once /readyz answers 200."""
    port = free_port()
    args = ["serve", "--artifact", str(artifact), "--host", "127.0.0.1", "--port", str(port)]
    if redis_url:
        args += ["--redis-url", redis_url]
    if knowledge:
        args += ["--knowledge", str(knowledge)]
    env = llm4msr_env(LLM4MSR_POLL_INTERVAL_S="0.2", **(extra_env or {}))
    proc = Proc(llm4msr_cmd(*args), tmp / f"ranker-{port}.log", env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(base + "/readyz", timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- ranker log ---\n{proc.log()}") from None
        yield base, proc
    finally:
        proc.stop()


def prometheus_exe() -> str | None:
    return shutil.which("prometheus") or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus") or None


def promtool_exe() -> str | None:
    return shutil.which("promtool")


def local_prometheus_config(tmp: Path, target: str, interval: str = "1s") -> Path:
    """The project's prometheus.yml and alerts.yml, with the ranker job pointed at `target` (host:port) and short
    scrape/evaluation intervals; everything else (job name, metrics path, rules) is as deployed."""
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = interval
    cfg["global"]["evaluation_interval"] = interval
    for group in cfg["scrape_configs"]:
        if group["job_name"] == "llm4msr-ranker":
            group.pop("dns_sd_configs")
            group["static_configs"] = [{"targets": [target]}]
            group["scrape_interval"] = interval
    cfg["scrape_configs"] = [g for g in cfg["scrape_configs"] if g["job_name"] == "llm4msr-ranker"]
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["interval"] = interval
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_prometheus(tmp: Path, target: str, interval: str = "1s") -> tuple[str, Proc]:
    """A real Prometheus on a loopback port with its TSDB in tmp; returns (base URL, process) once ready."""
    exe = prometheus_exe()
    if exe is None:
        raise RuntimeError("prometheus is not installed (Debian package prometheus)")
    config = local_prometheus_config(tmp, target, interval)
    port = free_port()
    proc = Proc(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        tmp / "prometheus.log",
        cwd=tmp,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/-/ready", 30)
    except TimeoutError as exc:
        proc.stop()
        raise RuntimeError(f"{exc}\n{proc.log()}") from None
    return base, proc


def prom_query(base: str, expr: str) -> list[dict]:
    """An instant query through the HTTP API; fails loudly on a PromQL error."""
    import httpx

    r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise AssertionError(f"{expr}: {body}")
    return body["data"]["result"]
