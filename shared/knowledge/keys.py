"""Redis key layout of published knowledge (DESIGN section 5); readers and the publisher share these names."""

from __future__ import annotations

import numpy as np

PREFIX = "llm4msr:kn"
CURRENT = f"{PREFIX}:current"
# Versions that are fully written, newest last (a list); lets the publisher find what to clean up.
VERSIONS = f"{PREFIX}:versions"

LEVEL_CODES = {"users": "u", "scenarios": "s", "items": "i"}
DEFAULT_USER_KEY_ID = "__default__"


def vector_key(version: str, level: str, id_: str) -> str:
    return f"{PREFIX}:{version}:{LEVEL_CODES[level]}:{id_}"


def user_key(version: str, user_id: str) -> str:
    return vector_key(version, "users", user_id)


def scenario_key(version: str, scenario: str) -> str:
    return vector_key(version, "scenarios", scenario)


def item_key(version: str, item_id: str) -> str:
    return vector_key(version, "items", item_id)


def default_user_key(version: str) -> str:
    return f"{PREFIX}:{version}:default_user"


def meta_key(version: str) -> str:
    """The manifest JSON of a version."""
    return f"{PREFIX}:{version}:meta"


def response_key(version: str, level: str, id_: str) -> str:
    """The LLM's answer text (for /explain)."""
    return f"{PREFIX}:{version}:r{LEVEL_CODES[level]}:{id_}"


def version_pattern(version: str) -> str:
    return f"{PREFIX}:{version}:*"


def encode_vector(vec: np.ndarray) -> bytes:
    """Little-endian float32 bytes."""
    return np.asarray(vec, dtype="<f4").tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
