"""How a knowledge vector is stored as a Redis value: float32, float16, or int8 with a per-vector scale.

The format is a publish option (`vector_format`), recorded per version in the published meta together with the
codec parameters, so that readers decode every version as it was written (docs/architecture.md, Redis keys).
Versions published before the option existed are float32.

- float32: little-endian float32, 4 * dim bytes (exact).
- float16: little-endian float16, 2 * dim bytes (relative error <= 2^-11; |x| must stay below 65504).
- int8:    4 bytes little-endian float32 per-vector scale s, then dim int8 codes q:
           x = offset + spread * (s * q), with the level's per-dimension offset (mean) and spread (standard
           deviation) fitted once per version and stored in the meta. Mean-pooled LLM hidden states have a few
           dimensions with a large constant offset (SmolLM2: ~35 against a typical 0.4); a plain absmax code would
           spend its 255 steps on those and leave ~2 steps for the rest. Standardizing first spends them on what
           varies between users, the same standardization the model applies before its PCA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import UserFacingError

FLOAT32 = "float32"
FLOAT16 = "float16"
INT8 = "int8"
FORMATS = (FLOAT32, FLOAT16, INT8)
# What `llm4msr knowledge publish` and the refresh job write unless told otherwise: int8 is the only format that
# brings a 576-d user near a quarter of its float32 memory (744 of 2,664 bytes by MEMORY USAGE) and it changes
# held-out AUC by less than 0.001 (deploy/redis-cluster.md has the measurements).
DEFAULT_FORMAT = INT8
# Versions published without a recorded format.
LEGACY_FORMAT = FLOAT32

_INT8_HEADER = 4  # the per-vector scale
_INT8_MAX = 127
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _mean_std(vectors: np.ndarray, rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation in float64, a block of rows at a time (a 100M-user table is not
    copied); a constant dimension, or an empty level, gets spread 1 (its codes are then 0 around the offset)."""
    n, dim = vectors.shape
    if n == 0:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    total = np.zeros(dim)
    for start in range(0, n, rows):
        total += vectors[start : start + rows].sum(0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(dim)
    for start in range(0, n, rows):
        squares += np.square(vectors[start : start + rows] - mean).sum(0)
    std = np.sqrt(squares / n)
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


class VectorLengthError(ValueError):
    """A stored vector whose byte length does not match the version's dimension and format."""


def check_format(vector_format: object) -> str:
    """The format if it is one readers decode; else a UserFacingError listing the choices."""
    if vector_format in FORMATS:
        return str(vector_format)
    raise UserFacingError(f"unknown vector format {str(vector_format)[:40]!r}; choose one of {', '.join(FORMATS)}")


def value_bytes(vector_format: str, dim: int) -> int:
    """The byte length of one stored vector."""
    if vector_format == FLOAT32:
        return 4 * int(dim)
    if vector_format == FLOAT16:
        return 2 * int(dim)
    return _INT8_HEADER + int(dim)


@dataclass(frozen=True)
class VectorCodec:
    """One level's stored form in one version. `offset`/`spread` (int8 only) are the level's per-dimension mean and
    standard deviation; they travel in the published meta."""

    format: str
    dim: int
    offset: np.ndarray | None = None
    spread: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return value_bytes(self.format, self.dim)

    # -- publishing -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vector_format: str, vectors: np.ndarray) -> VectorCodec:
        """The codec of a level whose vectors (all of them, [n, dim]) are about to be published."""
        vector_format = check_format(vector_format)
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = int(vectors.shape[1])
        if vector_format != INT8:
            return cls(vector_format, dim)
        offset, spread = _mean_std(vectors)
        return cls(INT8, dim, offset, spread)

    def encode_rows(self, vectors: np.ndarray) -> list[bytes]:
        """One stored value per row."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if self.format == FLOAT32:
            raw = vectors.astype("<f4")
        elif self.format == FLOAT16:
            raw = vectors.astype("<f2")
        else:
            raw = self._int8_rows(vectors)
        width = self.nbytes
        flat = np.ascontiguousarray(raw).view(np.uint8).reshape(len(vectors), width)
        return [row.tobytes() for row in flat]

    def encode(self, vector: np.ndarray) -> bytes:
        return self.encode_rows(np.asarray(vector, dtype=np.float32)[None, :])[0]

    def _int8_rows(self, vectors: np.ndarray) -> np.ndarray:
        """[n] records of (float32 scale, int8[dim] codes), packed without padding."""
        z = (vectors.astype(np.float64) - self.offset) / self.spread
        scale = np.abs(z).max(axis=1) / _INT8_MAX if z.size else np.zeros(len(z))
        safe = np.where(scale > 0, scale, 1.0)
        codes = np.clip(np.rint(z / safe[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        out = np.empty(len(z), dtype=np.dtype([("scale", "<f4"), ("codes", "i1", (self.dim,))]))
        out["scale"] = scale.astype(np.float32)
        out["codes"] = codes
        return out

    def unrepresentable(self, vectors: np.ndarray) -> np.ndarray:
        """Row positions this format cannot hold (non-finite values; float16: beyond +-65504)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        bad = ~np.isfinite(vectors).all(axis=1)
        if self.format == FLOAT16:
            bad |= (np.abs(vectors) > _FLOAT16_MAX).any(axis=1)
        return np.flatnonzero(bad)

    # -- reading ---------------------------------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        """The float32 vector; a value of another length raises VectorLengthError (a corrupt key)."""
        if len(data) != self.nbytes:
            raise VectorLengthError(
                f"{len(data)} bytes, expected {self.nbytes} ({self.format}, dim {self.dim})"
                if self.format != FLOAT32
                else f"{len(data)} bytes, expected {self.nbytes} (dim {self.dim})"
            )
        return self.decode_rows([data])[0]

    def decode_rows(self, values: Sequence[bytes]) -> np.ndarray:
        """[n, dim] float32 from values already known to have the right length."""
        if not values:
            return np.zeros((0, self.dim), np.float32)
        buf = b"".join(values)
        if self.format == FLOAT32:
            return np.frombuffer(buf, dtype="<f4").reshape(-1, self.dim).astype(np.float32)
        if self.format == FLOAT16:
            return np.frombuffer(buf, dtype="<f2").reshape(-1, self.dim).astype(np.float32)
        rec = np.frombuffer(buf, dtype=np.dtype([("scale", "<f4"), ("codes", "i1", (self.dim,))]))
        z = rec["codes"].astype(np.float32) * rec["scale"][:, None]
        return (self.offset + self.spread * z).astype(np.float32)

    def decode_many(self, values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(matrix [n, dim] with NaN rows where there is no usable value, present mask, corrupt mask): a None is
        absent, a value of the wrong length is corrupt."""
        n = len(values)
        present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
        ok = np.fromiter((v is not None and len(v) == self.nbytes for v in values), dtype=bool, count=n)
        matrix = np.full((n, self.dim), np.nan, dtype=np.float32)
        rows = np.flatnonzero(ok)
        if len(rows):
            matrix[rows] = self.decode_rows([values[i] for i in rows])
        return matrix, present, present & ~ok

    def roundtrip(self, vectors: np.ndarray) -> np.ndarray:
        """What readers get back for these vectors (verification, parity tests, the AUC bench)."""
        return self.decode_rows(self.encode_rows(vectors))

    # -- the published meta ------------------------------------------------------------------------------------
    def to_meta(self) -> dict:
        out: dict = {"format": self.format, "dim": self.dim}
        if self.format == INT8:
            out["offset"] = [float(v) for v in self.offset]
            out["spread"] = [float(v) for v in self.spread]
        return out

    @classmethod
    def from_meta(cls, meta: object, dim: int) -> VectorCodec:
        """The codec recorded in a version's meta; a malformed entry raises UserFacingError."""
        if not isinstance(meta, dict):
            raise UserFacingError(f"vector codec entry is {type(meta).__name__}, expected an object")
        vector_format = check_format(meta.get("format"))
        if int(meta.get("dim", dim)) != dim:
            raise UserFacingError(f"vector codec dim {meta.get('dim')} differs from the version's dim {dim}")
        if vector_format != INT8:
            return cls(vector_format, dim)
        try:
            offset = np.asarray(meta["offset"], dtype=np.float32)
            spread = np.asarray(meta["spread"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserFacingError(f"int8 vector codec without a valid offset/spread ({exc})") from None
        if offset.shape != (dim,) or spread.shape != (dim,) or not np.isfinite(offset).all():
            raise UserFacingError(f"int8 vector codec offset/spread are not {dim} finite values")
        return cls(INT8, dim, offset, spread)


FLOAT32_CODECS: dict[int, VectorCodec] = {}


def float32_codec(dim: int) -> VectorCodec:
    """The legacy float32 codec of a dimension (versions published without a format)."""
    codec = FLOAT32_CODECS.get(dim)
    if codec is None:
        codec = FLOAT32_CODECS[dim] = VectorCodec(FLOAT32, int(dim))
    return codec


def published_codecs(published: dict, dim: int) -> dict[str, VectorCodec]:
    """Each level's codec from a version's published meta (keyed by the levels' stored names); float32 for versions
    published before formats existed. A malformed entry raises UserFacingError naming the level."""
    from shared.knowledge.levels import LEVELS, table_name

    vector_format = published.get("vector_format", LEGACY_FORMAT)
    if vector_format == LEGACY_FORMAT and "codecs" not in published:
        return {level: float32_codec(dim) for level in LEVELS}
    entries = published.get("codecs")
    if not isinstance(entries, dict):
        raise UserFacingError(f"published meta names vector format {str(vector_format)[:40]!r} but has no codecs")
    codecs = {}
    for level in LEVELS:
        try:
            codecs[level] = VectorCodec.from_meta(entries.get(table_name(level)), dim)
        except UserFacingError as exc:
            raise UserFacingError(f"{level} {exc}") from None
    return codecs
