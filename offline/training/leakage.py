"""The training side's guards against knowledge that saw what it predicts (docs/architecture.md, Knowledge snapshot).

1. The split guard: a snapshot built on another split may have user prompts made from this split's validation or
   test rows, so training and evaluation refuse it.
2. The leak-free protocol of the user level. A serve user vector was built from all of the user's train positives,
   so on a train row it has seen the item the row predicts, while on a valid/test row (and in serving) it never
   has: a model fitted on it leans on a signal it will not get. Under leak-free, the train rows after each user's
   fit cutoff (LATE rows) read the snapshot's fit user vector, built from the rows before the cutoff only; EARLY
   rows read the cold-start vector (nothing known of the user yet: `early_rows="default_user"`) or are left out
   (`"drop"`); valid and test rows read the serve vectors as before. The cutoff is offline/data/fit_cutoff.py's,
   at the share the snapshot's fit vectors were built with (its manifest's fit_share).

The id/random controls and the plain backbone read no LLM vectors, so the protocol does not apply to them; the
artifact says so (UserProtocol.why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from offline.data.fit_cutoff import DEFAULT_FIT_SHARE, early_train_mask
from shared.errors import UserFacingError

if TYPE_CHECKING:
    from offline.data.split import Split
    from offline.training.config import TrainConfig
    from shared.knowledge.snapshot import KnowledgeSnapshot

NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class UserProtocol:
    """How a run's user level met its train rows; recorded in the artifact's train block."""

    protocol: str  # "leak-free", "full-history" or NOT_APPLICABLE
    why: str = ""  # why the protocol does not apply
    fit_share: float | None = None  # the share of each user's train history the fit vectors saw
    early_rows: str | None = None  # leak-free: "default_user" or "drop"
    early_train_rows: int = 0  # leak-free: train rows before the cutoff (trained on only with default_user)
    late_train_rows: int = 0  # leak-free: train rows after the cutoff, which read the fit vectors

    @property
    def applied(self) -> bool:
        return self.protocol == "leak-free"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_snapshot_split(snapshot: KnowledgeSnapshot, split: Split) -> None:
    """The split guard: knowledge must be built from this split's train rows."""
    if snapshot.manifest.split_fingerprint != split.fingerprint():
        raise UserFacingError(
            f"knowledge snapshot {snapshot.path} was built on another split (split fingerprint "
            f"{snapshot.manifest.split_fingerprint[:12]}, this data/split is {split.fingerprint()[:12]}): its user "
            "prompts may contain validation/test interactions. Rebuild the knowledge with the same data and split "
            "options (train: or pass the snapshot's split options)"
        )


def user_protocol(cfg: TrainConfig, snapshot: KnowledgeSnapshot | None) -> UserProtocol:
    """The protocol a run follows; a one-line error when the run needs a snapshot it lacks, or fit vectors."""
    if not cfg.llm4msr:
        return UserProtocol(NOT_APPLICABLE, why="the plain backbone reads no knowledge")
    source = cfg.wrapper.knowledge_source
    if source != "llm":
        return UserProtocol(NOT_APPLICABLE, why=f"the {source} control reads no LLM vectors")
    if snapshot is None:
        raise UserFacingError("LLM4MSR with --knowledge-source llm needs --knowledge SNAPSHOT")
    if "user" not in cfg.wrapper.levels:
        return UserProtocol(NOT_APPLICABLE, why="the model reads no user-level knowledge")
    if cfg.user_knowledge == "full-history":
        return UserProtocol("full-history")
    if not snapshot.has_fit_vectors:
        raise UserFacingError(
            f"knowledge snapshot {snapshot.path} has no fit user vectors, which --user-knowledge leak-free (the "
            f"default) needs: rebuild it with `llm4msr knowledge build ... --fit-share {DEFAULT_FIT_SHARE}`, or "
            "train with --user-knowledge full-history"
        )
    return UserProtocol("leak-free", fit_share=snapshot.manifest.fit_share, early_rows=cfg.early_rows)


def check_knowledge_inputs(cfg: TrainConfig, split: Split, snapshot: KnowledgeSnapshot | None) -> UserProtocol:
    """Every check on the knowledge a run reads, before any training: built on this split, present when needed,
    with fit vectors under leak-free. Returns the run's protocol."""
    if snapshot is not None and cfg.llm4msr:
        check_snapshot_split(snapshot, split)
    return user_protocol(cfg, snapshot)


@dataclass(frozen=True)
class TrainRows:
    """The train rows a run fits on, which of them are EARLY (None when the protocol is off), and the protocol
    with its row counts."""

    frame: pd.DataFrame
    early: np.ndarray | None
    protocol: UserProtocol


def protocol_train_rows(split: Split, protocol: UserProtocol) -> TrainRows:
    """The train rows under the protocol: all of them, or (leak-free, drop) the LATE ones only."""
    if not protocol.applied:
        return TrainRows(split.train, None, protocol)
    early = early_train_mask(split, protocol.fit_share)
    n_early = int(early.sum())
    protocol = dataclasses.replace(protocol, early_train_rows=n_early, late_train_rows=len(early) - n_early)
    if protocol.early_rows == "drop":
        return TrainRows(split.train[~early], np.zeros(len(early) - n_early, dtype=bool), protocol)
    return TrainRows(split.train, early, protocol)
