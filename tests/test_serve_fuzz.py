"""An OpenAPI-driven fuzz run (schemathesis) against the real service: no 5xx and no schema violation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures_serving import build_world, start_server

TOKEN = "fuzz-admin-token-0123456789abcdefghij"  # >= 32 characters (ServeSettings refuses less)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("serving-fuzz"), variants=("llm4msr-item",))
    srv = start_server(
        [
            "--artifact",
            str(world.artifacts["llm4msr-item"]),
            "--knowledge",
            str(world.knowledge_root),
            "--max-candidates",
            "50",
            "--max-body-bytes",
            "20000",
        ],
        tmp_path_factory.mktemp("logs") / "server.log",
        env={"LLM4MSR_ADMIN_TOKEN": TOKEN},
    )
    yield srv
    srv.stop()


def test_openapi_fuzz_finds_no_server_error(server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli"]  # the one installed beside this interpreter
    proc = subprocess.run(
        [
            *cmd,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            "--max-time",
            "25",
            "--workers",
            "1",
            "--seed",
            "7",
            "--generation-database",
            "none",
            "--no-color",
            "--request-timeout",
            "10",
            "--exclude-path",
            "/metrics",
            "--header",
            f"Authorization: Bearer {TOKEN}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    print(out)
    assert "Tested: 5" in out, "every operation but /metrics was exercised"
    assert " passed" in out
    assert "Traceback" not in server.log(), server.log()[-4000:]
