"""`--dtype auto` and the thread default (issue 12): the decision over a table of CPU/GPU capabilities (not only
this machine's), the default threads following the process's CPU affinity, and the bf16/fp32 parity of the embedded
SmolLM2 that keeps the dtype out of the knowledge space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_llm import tiny_model  # noqa: F401  (fixture)

from offline.knowledge.backends.base import (
    CpuCapability,
    choose_dtype,
    cpu_capability,
    parse_cpuinfo,
    resolve_dtype,
    resolve_threads,
)
from shared.errors import UserFacingError

REPO = Path(__file__).resolve().parents[1]

# /proc/cpuinfo excerpts (first processor) of the kinds of machines the default must handle.
CPUINFO = {
    "sapphire rapids (AMX)": (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\n"
    ),
    "zen 4 (AVX512-BF16)": (
        "processor\t: 0\nmodel name\t: AMD EPYC 9B14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    ),
    "zen 3 (AVX2 only)": "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n",
    "skylake (AVX512, no bf16)": "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 avx512f\n",
    # amx_tile alone (no amx_bf16) is not bf16 support; other processors' flags must not count.
    "amx_tile only": "processor\t: 0\nmodel name\t: odd\nflags\t\t: avx2 amx_tile\n\nprocessor\t: 1\nflags\t: amx_bf16\n",
    "arm (no x86 flags)": "processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n",
    "unreadable": "",
}
# case -> (native bf16 flags, dtype chosen for the CPU)
EXPECTED_CPU = {
    "sapphire rapids (AMX)": (("amx_bf16", "avx512_bf16"), "bfloat16"),
    "zen 4 (AVX512-BF16)": (("avx512_bf16",), "bfloat16"),
    "zen 3 (AVX2 only)": ((), "float32"),
    "skylake (AVX512, no bf16)": ((), "float32"),
    "amx_tile only": ((), "float32"),
    "arm (no x86 flags)": ((), "float32"),
    "unreadable": ((), "float32"),
}


@pytest.mark.parametrize("case", sorted(CPUINFO))
def test_auto_dtype_on_cpu_follows_native_bf16(case):
    cpu = parse_cpuinfo(CPUINFO[case])
    flags, dtype = EXPECTED_CPU[case]
    assert set(cpu.bf16_flags) == set(flags)
    choice = choose_dtype("auto", "cpu", cpu)
    assert choice.dtype == dtype
    recorded = choice.to_dict()
    assert recorded["cpu"]["native_bf16"] is bool(flags) and recorded["requested"] == "auto"
    assert recorded["device"] == "cpu" and recorded["reason"]
    if flags:
        assert all(f in choice.reason for f in flags)  # the log says which instructions made the choice
    else:
        assert "no native bf16" in choice.reason


@pytest.mark.parametrize(
    ("device", "cuda_bf16", "dtype"),
    [("cuda", True, "bfloat16"), ("cuda:1", True, "bfloat16"), ("cuda", False, "float16"), ("mps", None, "float32")],
)
def test_auto_dtype_on_gpus(device, cuda_bf16, dtype):
    # The CPU's capability does not matter on a GPU.
    for cpu in (CpuCapability("x", ("amx_bf16",)), CpuCapability("y")):
        assert choose_dtype("auto", device, cpu, cuda_bf16).dtype == dtype


def test_auto_dtype_without_a_visible_gpu_is_a_clear_error():
    with pytest.raises(UserFacingError, match="no CUDA GPU is visible.*--dtype"):
        choose_dtype("auto", "cuda", CpuCapability(), None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_explicit_dtype_wins_over_the_hardware(dtype):
    for device, cpu, cuda in (("cpu", CpuCapability(), None), ("cpu", CpuCapability("x", ("amx_bf16",)), None)):
        choice = choose_dtype(dtype, device, cpu, cuda)
        assert choice.dtype == dtype and "explicitly" in choice.reason
    assert choose_dtype(dtype, "cuda", CpuCapability(), None).dtype == dtype  # no GPU query needed
    with pytest.raises(UserFacingError, match="unknown dtype 'bf16'"):
        choose_dtype("bf16", "cpu", CpuCapability())


def test_this_machine_resolves_from_its_own_cpuinfo():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    choice = resolve_dtype("auto", "cpu")
    assert choice.cpu == cpu_capability() and choice.cpu.native_bf16 is native
    assert choice.dtype == ("bfloat16" if native else "float32")


def test_threads_default_to_the_cores_this_process_may_use(tiny_model, tmp_path):  # noqa: F811
    """Pinned to one core (as a container or taskset would), the hf backend runs one torch thread, not cpu_count."""
    assert resolve_threads(3) == 3
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = (
        "import os, sys, json; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "import torch; from offline.knowledge.backends import BackendConfig, make_backend; "
        "from offline.knowledge.backends.base import resolve_threads; "
        "b = make_backend(BackendConfig(model=sys.argv[1], dtype='float32')); "
        "print(json.dumps([resolve_threads(0), torch.get_num_threads(), b.threads, os.cpu_count()]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(env, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    resolved, torch_threads, backend_threads, cpu_count = json.loads(run.stdout.strip().splitlines()[-1])
    assert resolved == torch_threads == backend_threads == 1, run.stdout
    # Unpinned, the default is every allowed core; an explicit OMP_NUM_THREADS is respected.
    probe = "import os, json; from offline.knowledge.backends.base import resolve_threads; print(resolve_threads(0))"
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env)
    assert int(free.stdout) == len(os.sched_getaffinity(0)), free.stderr
    omp = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=dict(env, OMP_NUM_THREADS="3")
    )
    assert int(omp.stdout) == 3, omp.stderr


@pytest.mark.slow
def test_bf16_and_fp32_smollm2_vectors_agree():
    """Snapshots built on machines that chose different dtypes share a knowledge space only if their vectors agree:
    cosine >= 0.999 for the embedded SmolLM2 on real prompts (user prompts, scenario prompts, item texts)."""
    from offline.data.split import make_split
    from offline.data.synth import SynthConfig, generate
    from offline.knowledge import prompts as P
    from offline.knowledge.backends import BackendConfig, make_backend

    ds = generate(SynthConfig(users=6, items_per_scenario=4, main_impressions=8, side_impressions=3))
    users = list(P.user_prompts(ds, make_split(ds)).values())[:2]
    texts = users + list(P.scenario_prompts(ds).values())[:1] + list(P.item_texts(ds).values())[:3]
    short = texts[2:]  # last pooling: one prompt and the items (bf16 is emulated, so slow, on most CPUs)
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        with make_backend(BackendConfig(dtype=dtype)) as backend:
            vectors[dtype] = (backend.embed(texts, "mean"), backend.embed(short, "last"))
    for pooling, ref, got in zip(("mean", "last"), vectors["float32"], vectors["bfloat16"], strict=True):
        assert got.shape == ref.shape and got.shape[1] == 576
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        print(f"bf16 vs fp32 cosine, {pooling} pooling: min {cos.min():.5f} mean {cos.mean():.5f}")
        assert cos.min() >= 0.999, (pooling, cos)
        assert not np.array_equal(got, ref)  # really two dtypes
