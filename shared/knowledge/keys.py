"""Redis key layout of published knowledge (docs/architecture.md, Redis keys); readers and the publisher share
these names.

  llm4msr:kn:current                      the version readers serve (one SET flips it)
  llm4msr:kn:versions                     fully written versions, newest last (what cleanup may delete)
  llm4msr:kn:<version>:meta               manifest JSON, plus "published": {"counts", "id_chunks", "dim",
                                          "vector_format", "codecs", ...}
  llm4msr:kn:<version>:ids:<level>:<n>    JSON list of the level's ids, chunk n (ID_CHUNK ids per key; level is
                                          scenarios|users|items): readers discover ids here and never SCAN
  llm4msr:kn:<version>:{u,s,i}:<id>       vector in the version's format (shared/knowledge/vector_codec.py):
                                          float32 (4 * dim bytes), float16 (2 * dim) or int8 (4 + dim)
  llm4msr:kn:<version>:r{u,s,i}:<id>      the LLM's answer text (for /explain), where there is one
  llm4msr:kn:<version>:default_user       the cold-start user vector

A version name is `VERSION_RE` (what `llm4msr knowledge build` writes, e.g. 20240101T000000Z-1a2b3c4d): it goes
into key names and into the publisher's `SCAN MATCH llm4msr:kn:<version>:*`, so glob characters or ':' in it
could reach (and on cleanup delete) other versions' keys. `validate_version` guards every entry point.

No key carries a hash tag ({...}) for its version: on a Redis Cluster a version's keys spread over every slot and
node (shared/knowledge/redis_conn.py splits multi-key commands accordingly); `current` and `versions` are single
keys, so the flip stays one atomic SET.
"""

from __future__ import annotations

import re

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge.levels import table_name
from shared.knowledge.vector_codec import VectorLengthError, float32_codec, value_bytes

PREFIX = "llm4msr:kn"
CURRENT = f"{PREFIX}:current"
# Versions that are fully written, newest last (a list); lets the publisher find what to clean up.
VERSIONS = f"{PREFIX}:versions"

LEVEL_CODES = {"user": "u", "scenario": "s", "item": "i"}
DEFAULT_USER_KEY_ID = "__default__"

VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Ids per id-list key: ~2-5 MB of JSON each, far below Redis' 512 MB value limit and quick to move.
ID_CHUNK = 100_000
# Field of the meta JSON that the publisher adds next to the manifest.
PUBLISHED = "published"


def validate_version(version: object) -> str:
    """The version if it is a safe key segment; else a UserFacingError naming the value (shortened)."""
    if isinstance(version, str) and VERSION_RE.fullmatch(version):
        return version
    shown = repr(version)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise UserFacingError(
        f"invalid knowledge version {shown}: expected 1-128 characters of letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def vector_key(version: str, level: str, id_: str) -> str:
    return f"{PREFIX}:{version}:{LEVEL_CODES[level]}:{id_}"


def user_key(version: str, user_id: str) -> str:
    return vector_key(version, "user", user_id)


def scenario_key(version: str, scenario: str) -> str:
    return vector_key(version, "scenario", scenario)


def item_key(version: str, item_id: str) -> str:
    return vector_key(version, "item", item_id)


def default_user_key(version: str) -> str:
    return f"{PREFIX}:{version}:default_user"


def meta_key(version: str) -> str:
    """The manifest JSON of a version."""
    return f"{PREFIX}:{version}:meta"


def ids_key(version: str, level: str, chunk: int) -> str:
    """Chunk `chunk` of the level's id list (a JSON array)."""
    return f"{PREFIX}:{version}:ids:{table_name(level)}:{chunk}"


def id_chunks(n_ids: int) -> int:
    """How many id-list keys a level of n_ids ids takes (at least one, so an empty level is explicit)."""
    return max(1, -(-n_ids // ID_CHUNK))


def response_key(version: str, level: str, id_: str) -> str:
    """The LLM's answer text (for /explain)."""
    return f"{PREFIX}:{version}:r{LEVEL_CODES[level]}:{id_}"


def version_pattern(version: str) -> str:
    """SCAN MATCH pattern of every key of one version (validated: no glob character can widen it)."""
    return f"{PREFIX}:{validate_version(version)}:*"


def encode_vector(vec: np.ndarray) -> bytes:
    """Little-endian float32 bytes (the float32 format; other formats: shared/knowledge/vector_codec.py)."""
    return np.asarray(vec, dtype="<f4").tobytes()


def vector_bytes(dim: int) -> int:
    """The byte length of a float32 vector."""
    return value_bytes("float32", dim)


def decode_vector(data: bytes, dim: int | None = None) -> np.ndarray:
    """The float32 vector; with `dim`, a value of any other length raises VectorLengthError (corrupt key)."""
    if dim is not None:
        return float32_codec(dim).decode(data)
    if len(data) % 4:
        raise VectorLengthError(f"{len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
