"""`--levels auto`: which knowledge levels to use is decided on validation data, not assumed.

The knowledge helps where ids are sparse and can hurt where they are dense, so the run fits each candidate level
set (the plain backbone, scenario+user, scenario+user+item) with the same settings and seed, and keeps the one with
the best validation AUC (validation logloss when AUC is undefined, as early stopping does). A tie keeps the
simpler candidate. Each candidate is trained exactly as a run with those levels would be, so the chosen model is
byte-identical to `--levels <chosen>` (or `--no-llm4msr`). The test split plays no part in the choice.

The item level also depends on the field embeddings' init, and not the same way on every dataset: on sparse ids (a
700-user subset of amazon-arts-office, ~5 interactions per item) scenario+user+item was better on validation with
the wider earlier init (0.05) than with the default 1e-4 in 16 of 18 backbone x seed pairs, on dense ids
(ml-latest-small) worse in 18 of 18, while the other candidates did better at 1e-4 on average on both. So
scenario+user+item is fitted a second time with `auto_item_init_std` (when it is set and differs from
`embed_init_std`), named `scenario,user,item@init=<std>`; the chosen model is then the one of `--levels
scenario,user,item --embed-init-std <std>`.

The artifact's train block records the request (levels_auto) and the choice with every candidate's validation
numbers (`level_selection`); the model itself is an ordinary one, so the service needs nothing new.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from offline.training.config import TrainConfig
from offline.training.leakage import check_knowledge_inputs
from shared.errors import UserFacingError

if TYPE_CHECKING:
    from offline.data.split import Split
    from offline.training.trainer import TrainResult
    from shared.dataset.folder import Dataset
    from shared.knowledge.snapshot import KnowledgeSnapshot

    TrainFixed = Callable[[Dataset, Split, KnowledgeSnapshot | None, TrainConfig], TrainResult]

log = logging.getLogger(__name__)

NO_LEVELS = "none"  # the candidate without knowledge: the plain backbone
ITEM_LEVELS = "scenario,user,item"
# Candidate name -> its levels (None: the plain backbone), simplest first (ties keep the simpler one).
AUTO_CANDIDATES: dict[str, list[str] | None] = {
    NO_LEVELS: None,
    "scenario,user": ["scenario", "user"],
    ITEM_LEVELS: ["scenario", "user", "item"],
}


@dataclass(frozen=True)
class LevelCandidate:
    """One candidate's numbers at its best epoch (validation only)."""

    levels: str  # the candidate's name: its levels, with "@init=<std>" for the second-init item candidate
    valid_auc: float
    valid_logloss: float
    best_epoch: float  # fractional when validation runs more than once per epoch
    seconds: float


@dataclass(frozen=True)
class LevelSelection:
    """The choice of --levels auto and what it was made on."""

    chosen: str
    metric: str  # "auc" or "logloss": the validation metric the choice followed
    candidates: tuple[LevelCandidate, ...]

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "metric": self.metric,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
        }

    def summary(self) -> str:
        """One line for the console: every candidate's validation metric and the choice."""
        key = "valid_auc" if self.metric == "auc" else "valid_logloss"
        parts = [f"{c.levels} {getattr(c, key):.4f}" for c in self.candidates]
        return f"levels auto (validation {self.metric.upper()}): {', '.join(parts)} -> {self.chosen}"


def candidate_config(cfg: TrainConfig, levels: list[str] | None, **values: object) -> TrainConfig:
    """The request's settings with one candidate's levels (None: the plain backbone) and other values."""
    knowledge = {"llm4msr": False} if levels is None else {"levels": levels}
    return cfg.with_values(levels_auto=False, **knowledge, **values)


def candidate_configs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """Every candidate's settings by name, simplest first."""
    if cfg.auto_item_init_std < 0:
        raise UserFacingError(
            f"--auto-item-init-std must be >= 0 (0: no second-init candidate), got {cfg.auto_item_init_std}"
        )
    configs = {name: candidate_config(cfg, levels) for name, levels in AUTO_CANDIDATES.items()}
    std = cfg.auto_item_init_std
    if std > 0 and std != cfg.embed_init_std:
        configs[f"{ITEM_LEVELS}@init={std:g}"] = candidate_config(cfg, AUTO_CANDIDATES[ITEM_LEVELS], embed_init_std=std)
    return configs


def _score(result: TrainResult, metric: str) -> float:
    """Higher is better; NaN never wins."""
    valid = result.metrics["valid"]["overall"]
    value = valid["auc"] if metric == "auc" else -valid["logloss"]
    return -math.inf if math.isnan(value) else value


def train_auto(
    dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot | None, cfg: TrainConfig, train_fixed: TrainFixed
) -> TrainResult:
    """Trains every candidate with train_fixed and returns the best one's result, carrying the selection."""
    started = time.perf_counter()
    configs = candidate_configs(cfg)
    for candidate in configs.values():  # a missing input fails now, not after the first candidates trained
        check_knowledge_inputs(candidate, split, snapshot)
    best: TrainResult | None = None
    best_score, chosen, metric = -math.inf, NO_LEVELS, "auc"
    candidates = []
    for name, candidate in configs.items():
        log.info("levels auto: training candidate %s", name)
        result = train_fixed(dataset, split, snapshot, candidate)
        metric = result.early_stopping
        valid = result.metrics["valid"]["overall"]
        candidates.append(
            LevelCandidate(name, valid["auc"], valid["logloss"], result.best_epoch, round(result.seconds, 1))
        )
        score = _score(result, metric)
        if best is None or score > best_score:
            best, best_score, chosen = result, score, name
    selection = LevelSelection(chosen, metric, tuple(candidates))
    log.info("%s", selection.summary())
    return dataclasses.replace(best, config=cfg, seconds=time.perf_counter() - started, level_selection=selection)
