"""Token counts for prompt budgets without importing transformers on every build.

The budget must use exactly the counts of `AutoTokenizer.from_pretrained(model)(texts, add_special_tokens=False)`
(they decide which history lines a prompt keeps). Importing transformers and building that tokenizer costs ~4 s,
which dominates a refresh where few or no users changed. So the first time a model folder is used, the tokenizer
transformers actually builds (its Rust backend, after transformers has added tokens or rebuilt it from vocab files)
is serialized into the cache, keyed by the folder's tokenizer/config files and the library versions; later builds
load that serialization with the light `tokenizers` library and encode with it directly, which is what
transformers' fast tokenizers do. Tokenizers with Python-side encoding logic (slow tokenizers, classes that
override the encode path) are never cached and keep going through transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from offline.knowledge.prompts import TokenCounter

log = logging.getLogger(__name__)

# Files never read by a tokenizer (weights): left out of the cache key, everything else in the folder is hashed.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".ckpt")
# The fast tokenizer's encode path; a subclass that overrides any of these may tokenize differently than its
# Rust backend alone.
_ENCODE_PATH = (
    "__call__",
    "_call_one",
    "encode",
    "encode_plus",
    "batch_encode_plus",
    "_encode_plus",
    "_batch_encode_plus",
    "_switch_to_input_mode",
    "prepare_for_tokenization",
)
# Cache probes: texts with what tokenizers handle specially (added/special tokens are appended per model).
_PROBES = [
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "- The Lord of the Rings (2001) [Fantasy, Adventure]",
    "Ünïcödé café naïve — “quotes” ‘and’ dashes… 日本語 中文 한국어 emoji 🎬🍿",
    "numbers 1234567890 3.14159 1e-9 #42 @user https://example.com/a?b=c",
    "MiXeD CaSe wOrDs and UPPER lower",
]


def tokenizer_cache_dir() -> Path:
    from offline.knowledge.models import cache_dir

    return cache_dir().parent / "tokenizers"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("transformers", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


def cache_key(path: Path) -> str:
    """Hash of the folder's non-weight files (names and bytes) and of the transformers/tokenizers versions."""
    h = hashlib.sha256(json.dumps(_versions(), sort_keys=True).encode())
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _backend_counter(tokenizer) -> TokenCounter:
    """Counts with a `tokenizers.Tokenizer` (no truncation or padding: neither is asked for in a count)."""

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    return count


def auto_tokenizer_counter(tokenizer) -> TokenCounter:
    """Counts with a transformers tokenizer, no special tokens added (what every prompt budget uses)."""

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def _load_cached(file: Path):
    from tokenizers import Tokenizer

    try:
        data = json.loads(file.read_text())
        tok = Tokenizer.from_str(data["tokenizer"])
        tok.encode_special_tokens = bool(data["encode_special_tokens"])
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged or foreign cache file: rebuild it
        log.warning("ignoring tokenizer cache %s (%s)", file, e)
        return None
    tok.no_truncation()
    tok.no_padding()
    return tok


def _plain_backend(auto):
    """The Rust tokenizer that encodes exactly as `auto(..., add_special_tokens=False)`, or None."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(auto, PreTrainedTokenizerFast):
        return None
    cls = type(auto)
    if any(getattr(cls, m, None) is not getattr(PreTrainedTokenizerFast, m, None) for m in _ENCODE_PATH):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(auto.backend_tokenizer.to_str())
    tok.encode_special_tokens = bool(getattr(auto, "split_special_tokens", False))
    tok.no_truncation()
    tok.no_padding()
    # Belt and braces: the copy must count like transformers on probes, its special and added tokens included.
    probes = _PROBES + [f"{p}{t} x{t}" for t in auto.added_tokens_encoder for p in ("a", "")]
    if _backend_counter(tok)(probes) != auto_tokenizer_counter(auto)(probes):
        log.warning("the serialized tokenizer of %s counts differently from transformers: not cached", auto)
        return None
    return tok, tok.encode_special_tokens


def _write_cache(file: Path, tok, encode_special_tokens: bool) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"tokenizer": tok.to_str(), "encode_special_tokens": encode_special_tokens}, f)
        os.chmod(tmp, 0o644)  # a shared cache, like the converted models
        os.replace(tmp, file)
    except OSError as e:  # a read-only cache only costs speed
        log.info("tokenizer cache not written (%s)", e)


def load_token_counter(path: Path) -> TokenCounter:
    """Counts tokens of texts (no special tokens added) exactly as the model folder's AutoTokenizer does."""
    file = None
    try:
        file = tokenizer_cache_dir() / f"{cache_key(path)}.json"
    except OSError as e:
        log.info("tokenizer cache unusable (%s)", e)
    if file is not None:
        tok = _load_cached(file)
        if tok is not None:
            return _backend_counter(tok)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(path))
    plain = _plain_backend(auto)
    if plain is None:
        return auto_tokenizer_counter(auto)
    if file is not None:
        _write_cache(file, *plain)
    return _backend_counter(plain[0])
