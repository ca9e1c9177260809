"""No Redis password in any output: `knowledge publish`, `refresh` and `serve` run as real processes with
`redis://:s3cret@...` against a real redis-server that requires that password (succeeding), a wrong credential and
a dead port (failing); their stdout, stderr, logs, /readyz bodies and every file they wrote are searched for it."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import httpx
import pytest
from fixtures_llm import tiny_model  # noqa: F401  (fixture)

from shared.knowledge import keys as K
from shared.redact import redact_text, redact_url
from tests.conftest import RedisServer, free_port
from tests.fixtures_deploy import REPO, llm4msr_cmd, llm4msr_env
from tests.fixtures_serving import make_space, start_server, wait_until, write_snapshot

SECRET = "s3cret"


def test_redact_url_and_text():
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://user:s3cret@host/0") == "rediss://user:***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://s3cret@host/0") == "redis://***@host/0"  # a lone userinfo may be the password
    assert redact_url("unix://:s3cret@/run/redis.sock?db=0") == "unix://:***@/run/redis.sock?db=0"
    assert redact_url("redis://host/0?db=1&password=s3cret") == "redis://host/0?db=1&password=***"
    assert redact_url("redis://:p@ss@host/0") == "redis://:***@host/0"  # an unescaped '@' in the password
    assert redact_url(None) is None
    url = "redis://:s3%40cret@host/0"
    text = redact_text(f"AuthenticationError for {url}: password 's3@cret' and s3%40cret rejected", url)
    assert text == "AuthenticationError for redis://:***@host/0: password '***' and *** rejected"
    # Any URL with credentials in a text is masked, also one nobody passed in.
    assert redact_text("see rediss://u:pw@h:1/0 and http://x/y") == "see rediss://u:***@h:1/0 and http://x/y"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A real redis-server that requires the password."""
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"))
    server.start()
    server.client().config_set("requirepass", SECRET)
    yield server
    server.stop()


def urls(server: RedisServer, db: int = 0) -> dict[str, str]:
    port = server.port
    return {
        "ok": f"redis://:{SECRET}@127.0.0.1:{port}/{db}",
        "wrong": f"redis://nobody:{SECRET}@127.0.0.1:{port}/{db}",  # not a user of this server: WRONGPASS
        "dead": f"redis://:{SECRET}@127.0.0.1:{free_port()}/{db}",
    }


def assert_secret_nowhere(*texts: str, dirs: tuple[Path, ...] = ()) -> int:
    """Fails naming where the secret was found; returns how many files were searched (so a test can check that
    the search covered something)."""
    for i, text in enumerate(texts):
        assert SECRET not in text, f"secret in output #{i}: ...{text[max(0, text.find(SECRET) - 200) :][:400]}"
    n = 0
    for d in dirs:
        for path in Path(d).rglob("*"):
            if path.is_file():
                n += 1
                assert SECRET.encode() not in path.read_bytes(), f"secret in {path}"
    return n


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        llm4msr_cmd(*args), cwd=REPO, env=llm4msr_env(), capture_output=True, text=True, timeout=timeout
    )


def test_knowledge_publish(secured, tmp_path):
    snap = write_snapshot(tmp_path / "kn", "v1", ["a", "b"], ["u1", "u2"], ["i1"], make_space())
    u = urls(secured, db=1)  # db 1: the refresh and serve tests below own db 0

    ok = run_cli("knowledge", "publish", str(snap), "--redis-url", u["ok"])
    assert ok.returncode == 0, ok.stderr
    assert f"published knowledge v1 to redis://:***@127.0.0.1:{secured.port}/1" in ok.stdout
    client = secured.client().__class__.from_url(u["ok"])
    assert client.get(K.CURRENT) == b"v1"

    for case in ("wrong", "dead"):
        bad = run_cli("knowledge", "publish", str(snap), "--redis-url", u[case])
        assert bad.returncode == 2, bad.stderr
        line = bad.stderr.strip()
        assert line.startswith("error: publishing knowledge v1 to redis://") and "***@127.0.0.1" in line, line
        assert "\n" not in line
        assert_secret_nowhere(bad.stdout, bad.stderr)
    assert assert_secret_nowhere(ok.stdout, ok.stderr, dirs=(tmp_path,)) >= 4


@pytest.fixture(scope="module")
def refreshed(secured, synth_dir, tiny_model, tmp_path_factory):  # noqa: F811
    """One successful `llm4msr refresh` (tiny LLM, first model trained, published with the password)."""
    work = tmp_path_factory.mktemp("refresh-auth")
    proc = run_refresh(work, synth_dir, tiny_model, urls(secured)["ok"], "ok")
    return work, proc


def run_refresh(work: Path, data: Path, model: Path, url: str, name: str) -> subprocess.CompletedProcess:
    args = [
        "refresh", "--data", str(data), "--knowledge-root", str(work / "knowledge"),
        "--artifact-dir", str(work / "models" / "current"), "--redis-url", url,
        "--report", str(work / f"report-{name}.json"), "--model", str(model), "--dtype", "float32",
        "--train-epochs", "1", "--train-threads", "1", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    return run_cli(*args, timeout=600)


def test_refresh(refreshed, secured, synth_dir, tiny_model):  # noqa: F811
    import json

    work, ok = refreshed
    assert ok.returncode == 4, ok.stdout + ok.stderr[-3000:]  # ROLLOUT: first model trained, knowledge published
    report = json.loads((work / "report-ok.json").read_text())
    assert report["published"] and report["redis_url"] == f"redis://:***@127.0.0.1:{secured.port}/0"

    u = urls(secured)
    outputs = [ok.stdout, ok.stderr]
    for case in ("wrong", "dead"):
        bad = run_refresh(work, synth_dir, tiny_model, u[case], case)
        assert bad.returncode == 3, bad.stdout + bad.stderr[-3000:]  # PARTIAL: built, not published
        rep = json.loads((work / f"report-{case}.json").read_text())
        assert rep["steps"]["publish"]["status"] == "failed" and "***@127.0.0.1" in rep["steps"]["publish"]["error"]
        assert rep["redis_url"].startswith("redis://") and "***" in rep["redis_url"]
        outputs += [bad.stdout, bad.stderr]
    assert assert_secret_nowhere(*outputs, dirs=(work,)) >= 10


def readyz(url: str) -> tuple[int, str]:
    r = httpx.get(f"{url}/readyz", timeout=5)
    return r.status_code, r.text


wait_for = functools.partial(wait_until, timeout=20.0, interval=0.1)


def test_serve(refreshed, secured, tmp_path):
    work, ok = refreshed
    assert ok.returncode == 4, ok.stderr[-3000:]
    artifact = str(work / "models" / "current")
    u = urls(secured)
    texts: list[str] = []
    env = {"LLM4MSR_POLL_INTERVAL_S": "0.2", "LLM4MSR_REDIS_RETRY_S": "0.2"}

    srv = start_server(
        ["--artifact", artifact, "--redis-url", u["ok"], "--log-level", "info"], tmp_path / "ok.log", env=env
    )
    try:
        code, body = readyz(srv.url)
        assert code == 200 and '"redis_up":true' in body.replace(" ", ""), body
        texts.append(body)
        # An outage while serving: the warning names the Redis, masked.
        secured.stop()
        assert wait_for(lambda: "unreachable" in srv.log()), srv.log()[-3000:]
        texts.append(readyz(srv.url)[1])
    finally:
        srv.stop()
        if secured.proc is None:
            secured.start()
            secured.client().config_set("requirepass", SECRET)
    log = srv.log()
    assert f"Redis at redis://:***@127.0.0.1:{secured.port}/0 unreachable" in log, log[-3000:]
    texts.append(log)

    for case in ("wrong", "dead"):
        srv = start_server(
            ["--artifact", artifact, "--redis-url", u[case], "--log-level", "info"],
            tmp_path / f"{case}.log",
            env=env,
            wait_ready=False,
        )
        try:
            assert wait_for(lambda s=srv: "not ready until it answers" in s.log()), srv.log()[-3000:]
            code, body = readyz(srv.url)
            assert code == 503, body
            texts.append(body)
        finally:
            srv.stop()
        log = srv.log()
        assert "cannot read llm4msr:kn:current from Redis at redis://" in log and "***@127.0.0.1" in log, log
        texts.append(log)
    assert assert_secret_nowhere(*texts, dirs=(tmp_path,)) >= 3
