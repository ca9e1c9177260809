"""The interface every LLM backend implements, its configuration, and the hardware-dependent defaults both backends
share: the dtype chosen by `--dtype auto`, the thread count, and the exact token sequences they feed the model
(so that the build can count which texts get cut to max_length)."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from offline.knowledge.options import cli
from shared.errors import UserFacingError

log = logging.getLogger(__name__)

# Called with the number of texts just finished (drives the progress bar).
Progress = Callable[[int], None]

POOLINGS = ("mean", "last")
MODES = ("generate", "encode")
DTYPES = ("auto", "bfloat16", "float32", "float16")
# /proc/cpuinfo flags of native bf16 matrix instructions. Without them torch emulates bf16 on CPU, measured ~3x
# slower than float32 (AVX2-only EPYC, issue 12); with AMX-BF16 bf16 was ~3.4x faster than float32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Longest token sequence fed to the model; every snapshot before the field existed was built with this value.
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class BackendConfig:
    """The settings of an LLM backend; `llm4msr knowledge build` has one option per field (offline/knowledge/options.py)."""

    # A name in the backend registry (offline/knowledge/backends/__init__.py: BACKENDS, the CLI's choices).
    backend: str = "hf"
    # None or "smollm2" = the embedded SmolLM2-135M-Instruct; else a local Hugging Face model directory.
    model: str | None = field(
        default=None, metadata=cli(help="local Hugging Face model folder (default: embedded SmolLM2)")
    )
    # "auto" (resolve_dtype): bfloat16 where the CPU or GPU computes it natively, else float32 (CPU) / float16 (GPU).
    # bf16 and fp32 vectors agree to cosine >= 0.999 (tests/test_knowledge_dtype.py), so the dtype is not part of
    # the knowledge space.
    dtype: str = field(
        default="auto",
        metadata=cli(
            choices=DTYPES,
            help="auto: bfloat16 where the CPU (AMX-BF16/AVX512-BF16) or GPU computes it natively, "
            "else float32 (CPU) / float16 (GPU)",
        ),
    )
    device: str = field(default="cpu", metadata=cli(help="cpu, cuda, cuda:1 ... (vllm: cpu or any GPU device)"))
    # Texts per batch when batch_tokens is 0 (fixed-count batches).
    batch_size: int = field(default=16, metadata=cli(help="texts per batch when --batch-tokens is 0"))
    # hf: most padded tokens per batch (texts x longest, + max_new_tokens when generating), texts in length order:
    # short item texts go in large batches, long prompts in small ones. 0 = batches of batch_size texts.
    batch_tokens: int = field(
        default=8192,
        metadata=cli(
            help="hf: most padded tokens per batch (texts x longest, + --max-new-tokens when generating; padding "
            "kept under 10%%): short texts go in large batches, long prompts in small ones; 0 = fixed batches of "
            "--batch-size"
        ),
    )
    # hf: a token prefix shared by several texts of a call (the scenario preamble, the chat template's system turn)
    # runs once and its KV cache serves them all; the vectors equal the full forward's (tests/test_knowledge_prefix.py).
    prefix_reuse: bool = field(
        default=True,
        metadata=cli(
            help="hf: run every prompt in full instead of reusing the KV cache of the prefix the prompts share"
        ),
    )
    max_new_tokens: int = 96
    # torch threads (hf) / CPU threads (vllm-cpu); 0 = resolve_threads: OMP_NUM_THREADS, else the usable cores.
    threads: int = field(default=0, metadata=cli(help="torch/CPU threads (0 = OMP_NUM_THREADS, else the usable cores)"))
    # Longest text embedded or prompted, in tokens; longer ones are cut (counted and warned about by the build).
    # Part of the knowledge space: it changes the vectors of the texts it cuts.
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata=cli(
            help="longest text fed to the LLM, in tokens; longer ones are cut (counted, warned about); part of the "
            "knowledge space"
        ),
    )
    # Generation goes through the model's chat template when it has one (instruction-tuned models answer better).
    chat_template: bool = field(default=True, metadata=cli(help="prompt the model without its chat template"))
    # vllm only: the python of the environment that has vllm (LLM4MSR_VLLM_PYTHON or <repo>/.venv-vllm).
    vllm_python: str | None = field(
        default=None, metadata=cli(help="python of the vllm environment (env LLM4MSR_VLLM_PYTHON)")
    )
    gpu_memory_utilization: float = field(default=0.85, metadata=cli(hidden=True))
    # vllm only: run the model eagerly (no torch.compile, no CUDA graphs). None = eager on CPU, where compiling
    # costs ~70 s of engine start for ~16% throughput, and graphs on a GPU, where they speed up decoding.
    vllm_eager: bool | None = field(
        default=None,
        metadata=cli(help="vllm: run eagerly (default: eager on CPU; CUDA graphs and torch.compile on a GPU)"),
    )

    def __post_init__(self) -> None:
        if self.batch_tokens < 0:
            raise UserFacingError(
                f"--batch-tokens must be 0 (fixed batches of --batch-size texts) or positive, got {self.batch_tokens}"
            )
        if self.batch_size < 1:
            raise UserFacingError(f"--batch-size must be positive, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class CpuCapability:
    """What of the CPU decides the dtype: its name and which native bf16 matrix instruction sets it has."""

    model: str = ""
    bf16_flags: tuple[str, ...] = ()

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)

    def to_dict(self) -> dict:
        return {"model": self.model, "native_bf16": self.native_bf16, "bf16_flags": list(self.bf16_flags)}


def parse_cpuinfo(text: str) -> CpuCapability:
    """The capability from /proc/cpuinfo text (the first processor's `model name` and `flags`)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuCapability(model=model, bf16_flags=tuple(f for f in NATIVE_BF16_FLAGS if f in flags))


def cpu_capability(cpuinfo: str = "/proc/cpuinfo") -> CpuCapability:
    """This machine's capability; a CPU whose flags cannot be read counts as having no native bf16."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuCapability()


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a backend runs in and why (logged at start, recorded in the manifest)."""

    dtype: str
    reason: str
    requested: str
    device: str
    cpu: CpuCapability = field(default_factory=CpuCapability)

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "requested": self.requested,
            "reason": self.reason,
            "device": self.device,
            "cpu": self.cpu.to_dict(),
        }


def choose_dtype(requested: str, device: str, cpu: CpuCapability, cuda_bf16: bool | None = None) -> DtypeChoice:
    """The dtype for `requested` on `device`: a pure function of the hardware facts, so every case can be tested.

    cuda_bf16: whether the GPU computes bf16 natively (None: no GPU visible to this process).
    """
    if requested not in DTYPES:
        raise UserFacingError(f"unknown dtype {requested!r}; expected one of {DTYPES}")

    def choice(dtype: str, reason: str) -> DtypeChoice:
        return DtypeChoice(dtype=dtype, reason=reason, requested=requested, device=device, cpu=cpu)

    if requested != "auto":
        return choice(requested, "set explicitly (--dtype)")
    if device == "cpu":
        if cpu.native_bf16:
            return choice("bfloat16", f"the CPU computes bf16 natively ({', '.join(cpu.bf16_flags)})")
        return choice(
            "float32",
            "the CPU has no native bf16 matrix instructions (no amx_bf16 or avx512_bf16 flag): torch would emulate "
            "bf16, about 3x slower than float32",
        )
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            raise UserFacingError(
                f"--dtype auto cannot choose for device {device!r}: no CUDA GPU is visible to this process; pass "
                "--dtype bfloat16 (Ampere or newer) or --dtype float16"
            )
        if cuda_bf16:
            return choice("bfloat16", "the GPU supports bf16")
        return choice("float16", "the GPU has no native bf16 (older than Ampere): float16")
    return choice("float32", f"no dtype rule for device {device!r}: float32 (pass --dtype to choose another)")


def _cuda_bf16(device: str) -> bool | None:
    """Native bf16 on this CUDA device; None when no GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        return None
    with torch.cuda.device(torch.device(device)):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the emulation switch
            return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(requested: str, device: str) -> DtypeChoice:
    """choose_dtype with this machine's facts (torch is imported only for a CUDA device)."""
    cuda = _cuda_bf16(device) if requested == "auto" and device.startswith("cuda") else None
    return choose_dtype(requested, device, cpu_capability(), cuda)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """Threads for the LLM: the configured count, else OMP_NUM_THREADS when set, else the usable cores."""
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


# ----------------------------------------------------------------------------------------------- model inputs


def apply_chat_template(tokenizer, prompt: str) -> str:
    """The text an instruction-tuned model expects; the raw prompt when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


# Special tokens added when tokenizing, per operation: generation prompts are fed as written (the chat template
# already holds the model's markers); embedded texts get the tokenizer's own (BOS/EOS where it adds them).
ADD_SPECIAL_TOKENS = {"generate": False, "embed": True}


def model_texts(tokenizer, texts: Sequence[str], op: str, chat_template: bool) -> list[str]:
    """The strings a backend tokenizes for `op`: generation prompts go through the chat template when asked."""
    if op == "generate" and chat_template:
        return [apply_chat_template(tokenizer, t) for t in texts]
    return list(texts)


def encoded_lengths(tokenizer, inputs: Sequence[str], op: str) -> list[int]:
    """Untruncated token counts of model_texts(...) output, tokenized as the backends do for `op`."""
    if not inputs:
        return []
    enc = tokenizer(list(inputs), add_special_tokens=ADD_SPECIAL_TOKENS[op], truncation=False)
    return [len(ids) for ids in enc["input_ids"]]


def cut_token_ids(tokenizer, inputs: Sequence[str], op: str, max_length: int) -> list[list[int]]:
    """Token ids cut to max_length exactly as the hf backend's tokenizer call cuts them (first tokens kept)."""
    if not inputs:
        return []
    enc = tokenizer(list(inputs), add_special_tokens=ADD_SPECIAL_TOKENS[op], truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def input_lengths(tokenizer, texts: Sequence[str], op: str, config: BackendConfig) -> list[int]:
    """Untruncated token counts of what a backend feeds the model for `op` (chat template included)."""
    return encoded_lengths(tokenizer, model_texts(tokenizer, texts, op, config.chat_template), op)


def over_length(tokenizer, texts: Sequence[str], op: str, config: BackendConfig) -> list[bool]:
    """Which texts a backend cuts to config.max_length tokens for `op` (the build counts and reports them)."""
    return [n > config.max_length for n in input_lengths(tokenizer, texts, op, config)]


class Backend(ABC):
    """Generates answers and embeds texts with one model.

    embed returns raw (not normalized) float32 pooled final-layer hidden states, shape [len(texts), hidden_size].
    """

    config: BackendConfig
    model_name: str
    hidden_size: int

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    @abstractmethod
    def generate(self, prompts: Sequence[str], progress: Progress | None = None) -> list[str]:
        """Greedy (deterministic) answers, max_new_tokens each; progress(n) after each finished batch."""

    @abstractmethod
    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray: ...

    def end_generation(self) -> None:  # noqa: B027 (optional hook)
        """Called when no more generate calls follow (lets vllm free the generating engine)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases engines and processes."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
