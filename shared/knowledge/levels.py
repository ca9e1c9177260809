"""The knowledge levels: one vocabulary for the snapshot, the Redis keys, the model and the service.

A level is named in the singular everywhere in code. What is stored keeps its plural table name: the snapshot's
`<table>.parquet` files, the manifest's per-level counts and the Redis id lists (so versions written before this
vocabulary stay readable); `table_name` is the only translation.
"""

from __future__ import annotations

LEVELS = ("scenario", "user", "item")
# The levels that drive meta layers (item knowledge feeds the input only).
META_LEVELS = ("scenario", "user")


def table_name(level: str) -> str:
    """The stored name of a level: its snapshot file stem, manifest count key and Redis id-list segment."""
    if level not in LEVELS:
        raise ValueError(f"unknown knowledge level {level!r}; expected one of {', '.join(LEVELS)}")
    return f"{level}s"


def level_of(name: str) -> str:
    """The level of a stored (plural) or code (singular) name."""
    level = name[:-1] if name.endswith("s") and name[:-1] in LEVELS else name
    if level not in LEVELS:
        raise ValueError(f"unknown knowledge level {name!r}; expected one of {', '.join(LEVELS)}")
    return level
