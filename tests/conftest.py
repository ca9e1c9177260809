"""Fixtures shared by the suite: real Redis servers, the shared datasets, a small synthetic dataset."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.required import require

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port; can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shared_data() -> Path:
    require(
        SHARED_DATA.is_dir(),
        f"real datasets not present at {SHARED_DATA} (only the project's CI and dev machines have them)",
    )
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (read-only for tests: copy it before changing anything)."""
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(generate(SynthConfig(users=60, items_per_scenario=40, main_impressions=20, side_impressions=5)), out)
    return out


@pytest.fixture(scope="session", autouse=True)
def llm4msr_cache() -> Iterator[Path]:
    """Keeps the suite out of ~/.cache/llm4msr: converted models, source hashes and tokenizer caches go to a test
    cache kept across sessions (SmolLM2 is converted once, not every run); LLM4MSR_TEST_CACHE moves it."""
    root = Path(os.environ.get("LLM4MSR_TEST_CACHE") or REPO / ".pytest_cache" / "llm4msr")
    root.mkdir(parents=True, exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("LLM4MSR_CACHE", str(root))
    yield root
    patch.undo()
