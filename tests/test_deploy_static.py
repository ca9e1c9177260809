"""The deployment files are consistent with each other and with the code (no Docker engine runs here).

Compose services, profiles, healthchecks, ports, volumes, build contexts and images; every command a container
runs parses with the real `llm4msr` argument parser; Prometheus and Grafana provisioning point at each other;
Kubernetes objects reference each other by the right names; promtool accepts the config and the rules.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.fixtures_deploy import (
    ALERTS,
    DASHBOARDS,
    DEPLOY,
    K8S,
    PROMETHEUS_DIR,
    REPO,
    alert_rules,
    dashboard_exprs,
    load_compose,
    load_k8s,
    metric_names,
    promtool_exe,
)
from tests.required import require

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
VERSION = PYPROJECT["project"]["version"]
EXPECTED_SERVICES = {"redis", "ranker", "prometheus", "grafana", "knowledge-refresh", "train"}
PROJECT_IMAGES = {"deploy/Dockerfile": f"llm4msr:{VERSION}", "deploy/Dockerfile.vllm": f"llm4msr-vllm:{VERSION}"}


def parse_cli(argv: list[str]):
    """Parses argv with the real parser; argparse's exit on an unknown command/option becomes a test failure."""
    from llm4msr_cli import build_parser

    assert argv[0] in SCRIPTS, f"{argv[0]!r} is not a console script of the project ({sorted(SCRIPTS)})"
    parser = build_parser()
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed why
        pytest.fail(f"`{' '.join(argv)}` does not parse with the llm4msr CLI (exit {exc.code})")


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def pinned(image: str) -> bool:
    """A registry image with an explicit version tag (or digest), never latest/a floating major."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.match(r"^v?\d+\.\d+", tag) is not None


def mount_points(volumes: list[str]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only) of compose short-syntax volumes."""
    out = {}
    for v in volumes:
        parts = v.split(":")
        # "${VAR:-./x}:/path:ro" contains a colon inside the variable default
        if v.startswith("${"):
            end = v.index("}") + 1
            parts = [v[:end], *v[end + 1 :].split(":")]
        source, target, *mode = parts
        out[target] = (source, "ro" in mode)
    return out


def under(path: str, mounts: dict) -> str | None:
    for target in mounts:
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target
    return None


# --------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_compose_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == EXPECTED_SERVICES
    assert services["knowledge-refresh"]["profiles"] == ["gpu"]
    assert services["train"]["profiles"] == ["train"]
    for name in ("redis", "ranker", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    # the one-shot jobs run and exit
    for name in ("knowledge-refresh", "train"):
        assert services[name]["restart"] == "no"


def test_compose_images_pinned_and_builds_exist(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image name"
        if "build" in svc:
            build = svc["build"]
            context = (REPO / build["context"]).resolve()
            assert context == REPO, f"{name}: the build context must be the repository root (the code is copied)"
            dockerfile = build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing"
            assert image == PROJECT_IMAGES[dockerfile], f"{name}: image {image} should be {PROJECT_IMAGES[dockerfile]}"
        else:
            assert pinned(image), f"{name}: image {image} is not pinned to a version"


@pytest.mark.parametrize("dockerfile", sorted(PROJECT_IMAGES))
def test_dockerfiles_pinned_and_copy_sources_exist(dockerfile):
    text = (REPO / dockerfile).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(pinned(f) for f in froms), froms
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile}: COPY source {src} does not exist in the build context"
    # the image resets the base image's entrypoint, so compose/k8s commands run as written
    assert re.search(r"^ENTRYPOINT \[\]$", text, re.M)
    ignore = REPO / (dockerfile + ".dockerignore")
    assert ignore.is_file(), f"{ignore} missing: the whole repository (data, venvs) would be sent to the builder"
    if dockerfile == "deploy/Dockerfile":
        assert re.search(r"ARG TORCH_VERSION=2\.13\.0\b", text), "CPU torch must be pinned to 2.13.0"
        assert "whl/cpu" in text, "torch must come from the CPU wheel index"
    else:
        vllm_pin = [d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm")]
        assert vllm_pin == ["vllm==0.33.0"]
        assert froms[0] == "vllm/vllm-openai:v0.33.0", "the vLLM image must match the [gpu] extra's vllm pin"
        assert '".[gpu]"' in text


def test_every_compose_command_is_a_real_llm4msr_command(compose):
    project = [n for n, s in compose["services"].items() if "build" in s]
    assert set(project) == {"ranker", "knowledge-refresh", "train"}
    for name in project:
        cmd = compose["services"][name]["command"]
        assert isinstance(cmd, list), f"{name}: use the exec form (a list)"
        parse_cli(cmd)
    assert compose["services"]["ranker"]["command"][1] == "serve"
    assert compose["services"]["knowledge-refresh"]["command"][1] == "refresh"
    assert compose["services"]["train"]["command"][1] == "train"


def test_compose_paths_in_commands_are_mounted(compose):
    """Every path a command reads or writes lies in a mounted volume, with write access where it writes."""
    checks = {
        "ranker": {"--artifact": False},
        "knowledge-refresh": {"--data": False, "--knowledge-root": True, "--artifact-dir": True, "--report": True},
        "train": {"--data": False},
    }
    for name, opts in checks.items():
        svc = compose["services"][name]
        mounts = mount_points(svc["volumes"])
        for opt, writes in opts.items():
            path = option(svc["command"], opt)
            assert path, f"{name}: {opt} missing"
            target = under(path, mounts)
            assert target, f"{name}: {opt} {path} is not inside a mounted volume ({sorted(mounts)})"
            if writes:
                assert not mounts[target][1], f"{name}: {opt} {path} is mounted read-only"
    # the ranker serves the artifact the jobs write
    refresh = compose["services"]["knowledge-refresh"]["command"]
    assert option(compose["services"]["ranker"]["command"], "--artifact") == option(refresh, "--artifact-dir")
    assert option(compose["services"]["train"]["command"], "--out") == option(refresh, "--artifact-dir")
    assert option(compose["services"]["train"]["command"], "--knowledge") == option(refresh, "--knowledge-root")
    ranker_mounts = mount_points(compose["services"]["ranker"]["volumes"])
    assert all(ro for _src, ro in ranker_mounts.values()), "the ranker only reads its volumes"


def test_compose_volumes_declared_and_bind_sources_exist(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for source, _ro in mount_points(svc.get("volumes", [])).values():
            if source.startswith("${"):
                default = re.match(r"\$\{\w+:-([^}]+)\}", source)
                assert default, f"{name}: {source} needs a default"
            elif source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                used.add(source)
                assert source in declared, f"{name}: named volume {source} is not declared"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    # persistence of Redis: AOF on, data in a named volume
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert mount_points(redis["volumes"])["/data"][0] == "redis-data"


def test_compose_healthchecks_ports_and_dependencies(compose):
    services = compose["services"]
    ranker = services["ranker"]
    port = option(ranker["command"], "--port")
    assert option(ranker["command"], "--host") == "0.0.0.0", "the ranker must listen beyond the container's loopback"
    loopback = "${LLM4MSR_BIND_ADDRESS:-127.0.0.1}"
    assert f"{loopback}:{port}:{port}" in ranker["ports"]
    health = " ".join(ranker["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in health
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            assert dep in services
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no check"
    # the ranker's Redis URL points at the compose redis service on its default port
    for name in ("ranker", "knowledge-refresh"):
        url = option(services[name]["command"], "--redis-url")
        assert url == "redis://redis:6379/0", f"{name}: {url}"
    assert f"{loopback}:9090:9090" in services["prometheus"]["ports"]
    assert f"{loopback}:3000:3000" in services["grafana"]["ports"]
    # every published port binds to loopback unless the operator says otherwise
    for name, svc in services.items():
        for mapping in svc.get("ports") or []:
            assert str(mapping).startswith(loopback + ":"), f"{name} publishes {mapping} on every interface"


def test_compose_exposes_no_admin_surface_with_defaults(compose):
    services = compose["services"]
    assert not any("enable-lifecycle" in str(a) for a in services["prometheus"]["command"])
    env = services["grafana"]["environment"]
    # ${VAR:?message}: compose refuses to start without a password; there is no default one
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    assert "LLM4MSR_ADMIN_TOKEN" not in " ".join(map(str, services["ranker"]["command"]))


def test_gpu_profile_reserves_a_gpu_and_uses_vllm(compose):
    svc = compose["services"]["knowledge-refresh"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert option(svc["command"], "--backend") == "vllm"
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile.vllm"


# --------------------------------------------------------------------------------------------- prometheus


def test_prometheus_config_scrapes_the_ranker(compose):
    prom = compose["services"]["prometheus"]
    mounts = mount_points(prom["volumes"])
    assert mounts["/etc/prometheus"] == ("./deploy/prometheus", True)
    cfg_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    cfg_file = PROMETHEUS_DIR / Path(cfg_arg.split("=", 1)[1]).relative_to("/etc/prometheus")
    cfg = yaml.safe_load(cfg_file.read_text())
    for rule_file in cfg["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "llm4msr-ranker")
    assert job["metrics_path"] == "/metrics"
    port = int(option(compose["services"]["ranker"]["command"], "--port"))
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["ranker"] and sd["port"] == port
    # the alert rules use the same job label
    assert any('job="llm4msr-ranker"' in r["expr"] for r in alert_rules())


def test_promtool_accepts_config_and_rules():
    require(promtool_exe(), "promtool not installed (Debian package prometheus; .ci/run installs it)")
    out = subprocess.run(
        [promtool_exe(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool_exe(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(alert_rules())
    assert f"SUCCESS: {n} rules found" in out.stdout


def test_alert_rules_cover_the_objectives():
    alerts = {r["alert"]: r for r in alert_rules() if "alert" in r}
    records = {r["record"]: r["expr"] for r in alert_rules() if "record" in r}

    def resolved(expr: str) -> str:
        for name, body in records.items():
            expr = expr.replace(name, f"({body})")
        return expr

    wanted = {
        "Llm4msrRankLatencyP99OverBudget": "llm4msr_rank_latency_seconds_bucket",
        "Llm4msrRankErrorRatioHigh": "llm4msr_requests_total",
        "Llm4msrKnowledgeFallbackRatioHigh": "llm4msr_knowledge_fallback_total",
        "Llm4msrKnowledgeStale": "llm4msr_knowledge_created_timestamp_seconds",
    }
    for name, metric in wanted.items():
        assert name in alerts, f"alert {name} missing"
        assert metric in resolved(alerts[name]["expr"]), f"{name} does not read {metric}"
        assert alerts[name]["labels"]["severity"] in {"page", "ticket"}
        assert alerts[name]["annotations"]["summary"]


# --------------------------------------------------------------------------------------------- grafana


def test_grafana_provisioning_matches_compose(compose):
    graf = compose["services"]["grafana"]
    mounts = mount_points(graf["volumes"])
    assert mounts["/etc/grafana/provisioning"][0] == "./deploy/grafana/provisioning"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/llm4msr.yml").read_text())["providers"][0]
    dash_path = prov["options"]["path"]
    assert mounts[dash_path][0] == "./deploy/grafana/dashboards"
    assert DASHBOARDS, "no dashboard JSON"
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "deploy/grafana/dashboards" / Path(home).relative_to(dash_path)).is_file()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
        assert ds_var["current"]["value"] == ds["uid"]


def test_dashboard_has_the_required_panels():
    dash = json.loads((DEPLOY / "grafana/dashboards/llm4msr-ranker.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(dashboard_exprs(DEPLOY / "grafana/dashboards/llm4msr-ranker.json"))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(llm4msr_rank_latency_seconds_bucket" in exprs
    for needle in (
        "llm4msr_requests_total",
        'status=~"5.."',
        "llm4msr_knowledge_fallback_total",
        "llm4msr_rank_candidates_bucket",
        "llm4msr_rank_stage_seconds_bucket",
        "llm4msr_versions_info",
    ):
        assert needle in exprs, needle
    for p in panels:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24


def test_dashboards_and_alerts_read_only_llm4msr_metrics():
    """Sanity of the name extraction the runtime test relies on (it checks these names against /metrics)."""
    names = set()
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            names |= metric_names(expr)
    for rule in alert_rules():
        names |= metric_names(rule["expr"])
    assert "llm4msr_rank_latency_seconds_bucket" in names and "up" in names
    assert all(n == "up" or n.startswith("llm4msr_") for n in names)
    assert not any(n.startswith("llm4msr:") for n in names)


# --------------------------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    docs = load_k8s()
    by_key = {}
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d["__file__"]
        key = (d["kind"], d["metadata"]["name"])
        assert key not in by_key, f"duplicate {key}"
        by_key[key] = d
    return by_key


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files


def _pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def test_k8s_ranker_objects_reference_each_other(k8s):
    dep = k8s[("Deployment", "llm4msr-ranker")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s[("Service", "llm4msr-ranker")]
    assert svc["spec"]["selector"].items() <= labels.items()
    container = _pod_spec(dep)["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert int(option(container["command"], "--port")) == port_names["http"]
    assert option(container["command"], "--host") == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    hpa = k8s[("HorizontalPodAutoscaler", "llm4msr-ranker")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "llm4msr-ranker")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port_names["http"])


def test_k8s_commands_secrets_and_volumes(k8s):
    secret = k8s[("Secret", "llm4msr-redis")]
    claims = {name for kind, name in k8s if kind == "PersistentVolumeClaim"}
    for key in [("Deployment", "llm4msr-ranker"), ("CronJob", "llm4msr-refresh")]:
        pod = _pod_spec(k8s[key])
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in pod["containers"]:
            parse_cli(c["command"])
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["LLM4MSR_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
            assert "--redis-url" not in c["command"], "the Redis URL (a secret) must not be on the command line"
            for m in c["volumeMounts"]:
                assert m["name"] in volumes
    cron = k8s[("CronJob", "llm4msr-refresh")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = _pod_spec(cron)
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    container = pod["containers"][0]
    assert container["command"][1] == "refresh"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the job does not retry a usage error (exit 2)
    no_retry = {
        v for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob" for v in r["onExitCodes"]["values"]
    }
    assert 2 in no_retry
    # the artifact the job writes is the one the ranker serves, on the same claim
    ranker = _pod_spec(k8s[("Deployment", "llm4msr-ranker")])["containers"][0]
    assert option(ranker["command"], "--artifact") == option(container["command"], "--artifact-dir")


def test_worker_count_matches_the_cpus_given(compose, k8s):
    """One worker process per CPU: the compose service's CPU limit and the pod's CPU request (which the HPA's
    utilisation target is a share of) equal LLM4MSR_WORKERS, and the drain fits the pod's grace period."""
    ranker = compose["services"]["ranker"]
    assert int(ranker["environment"]["LLM4MSR_WORKERS"]) == float(ranker["deploy"]["resources"]["limits"]["cpus"])
    pod = _pod_spec(k8s[("Deployment", "llm4msr-ranker")])
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["LLM4MSR_WORKERS"]) == float(container["resources"]["requests"]["cpu"])
    from online.settings import ServeSettings

    drain = float(env.get("LLM4MSR_DRAIN_TIMEOUT_S") or ServeSettings.model_fields["drain_timeout_s"].default)
    assert pod["terminationGracePeriodSeconds"] > 5 + drain  # preStop sleep, then SIGTERM drains
