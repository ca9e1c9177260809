"""String id -> integer index maps for the embedding tables, with index 0 reserved for out-of-vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

OOV_INDEX = 0


@dataclass
class Vocabulary:
    """tokens[i] has index i + 1; anything unseen maps to OOV_INDEX."""

    name: str
    tokens: list[str]
    _index: pd.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.tokens)
        if not self._index.is_unique:
            raise ValueError(f"vocabulary '{self.name}' has duplicate tokens")

    @classmethod
    def build(cls, name: str, values: Iterable[str]) -> Vocabulary:
        """Tokens in first-seen order, so the same data always gives the same indices."""
        return cls(name, [str(v) for v in pd.unique(pd.Series(list(values), dtype=str))])

    def __len__(self) -> int:
        """Embedding table size: tokens plus the OOV row."""
        return len(self.tokens) + 1

    def encode(self, values: Sequence[str] | pd.Series | np.ndarray) -> np.ndarray:
        codes = self._index.get_indexer(pd.Index(values, dtype=object))
        return (codes + 1).astype(np.int64)  # -1 (unseen) becomes 0 = OOV

    def to_dict(self) -> dict:
        return {"name": self.name, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(data["name"], list(data["tokens"]))
