"""The training configuration, free of torch so that the CLI can build its flags from it cheaply.

Its flat form (`to_dict`, `from_flat`) is what artifacts (config.json's `train`) and compare's run records store:
the wrapper's hyper-parameters sit beside the training ones, under the keys every earlier version wrote, so
artifacts and finished compare runs made before stay readable and reusable. A stored form without a field added
later means that field's old behaviour (`ABSENT_IN_STORED`), not today's default: `fill_absent` reads it so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from offline.common import build_config, config_fields
from shared.errors import UserFacingError
from shared.models.backbones import backbone_names
from shared.models.llm4msr_config import ABSENT_MEANS, LLM4MSRConfig

# What leak-free does with the train rows before each user's fit cutoff (the better one on validation AUC).
DEFAULT_EARLY_ROWS = "default_user"
# Flat fields newer than the first artifacts and compare runs, with the value their absence means in a stored
# config: the training of that time (ungated wrapper, user vectors from the full train history, fixed levels;
# early_rows has no effect under full-history, so its default stands for any value; raw, uncalibrated scores;
# the field embeddings' first init; --levels auto without its second-init candidate; the knowledge pathway at the
# backbone's learning rate).
ABSENT_IN_STORED: dict[str, Any] = {
    **ABSENT_MEANS,
    "user_knowledge": "full-history",
    "early_rows": DEFAULT_EARLY_ROWS,
    "levels_auto": False,
    "calibrate": False,
    "embed_init_std": 0.05,
    "auto_item_init_std": 0.0,
    "knowledge_lr_scale": 1.0,
    "checks_per_epoch": 1,
    "norm_stats_batches": 0,
}


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = field(default="star", metadata={"choices": backbone_names})
    # Hyper-parameters of the backbone's config class (validated when the model is built).
    backbone_params: dict = field(default_factory=dict, metadata={"cli": False})
    llm4msr: bool = field(default=True, metadata={"help": "the plain backbone, no meta networks"})
    # --levels auto (the CLI's default): fit the plain backbone, scenario,user and scenario,user,item with these
    # settings and seed and keep the best on validation AUC (offline/training/auto_levels.py). The CLI sets it
    # from --levels, so it has no flag of its own.
    levels_auto: bool = field(default=False, metadata={"cli": False})
    # How the user level's LLM vectors meet train rows (docs/architecture.md, Knowledge snapshot): a serve user
    # vector was built from the train positives, so on a train row it has seen the item being predicted.
    user_knowledge: Literal["leak-free", "full-history"] = field(
        default="leak-free",
        metadata={
            "help": "leak-free: train rows after each user's fit cutoff read the snapshot's fit user vectors (built "
            "from the history before it), valid/test rows the serve vectors; full-history: every row reads the "
            "serve vectors (the protocol before fit vectors existed)"
        },
    )
    early_rows: Literal["default_user", "drop"] = field(
        default=DEFAULT_EARLY_ROWS,
        metadata={
            "help": "leak-free: train rows before each user's fit cutoff read the cold-start user vector "
            "(default_user) or are not trained on (drop)"
        },
    )
    # The wrapper's settings (used when llm4msr is on); its knowledge_dim is set from the snapshot at build time.
    wrapper: LLM4MSRConfig = field(default_factory=LLM4MSRConfig)
    embed_dim: int = 16
    embed_init_std: float = field(
        default=1e-4,
        metadata={
            "help": "std of the normal init of the field embeddings (user, item, scenario, category); small, so "
            "that rarely seen IDs stay near a neutral vector"
        },
    )
    # --levels auto also fits its scenario,user,item candidate with this embedding init (0: it does not). On sparse
    # ids the item level did better with the earlier, wider init, on dense ids with the small one; validation
    # decides per run (offline/training/auto_levels.py).
    auto_item_init_std: float = field(
        default=0.05,
        metadata={
            "help": "--levels auto also fits scenario,user,item with this embedding init and keeps it if it is "
            "better on validation (0: no such candidate)"
        },
    )
    lr: float = 1e-3
    # The knowledge pathway (the wrapper's projections, gates, meta networks and their outputs) learns at lr times
    # this; the field embeddings and the backbone at lr. On the whole amazon-arts-office the ID embeddings overfit
    # after an epoch or two, so the knowledge has to be taken up early: PLE's scenario,user,item model gained 0.003
    # validation AUC at 3x (README, Quality), and 10x was no better than 3x.
    knowledge_lr_scale: float = field(
        default=3.0,
        metadata={"help": "LLM4MSR: learning rate of the knowledge pathway as a multiple of --lr (> 0)"},
    )
    weight_decay: float = 0.0
    batch_size: int = 2048
    epochs: int = field(default=10, metadata={"help": "maximum epochs (early stopping on validation AUC)"})
    patience: int = field(default=1, metadata={"help": "epochs without validation AUC gain before stopping"})
    # STAR's partitioned normalization (any RecountableStatistics layer) normalizes with running statistics in eval
    # mode; with LLM4MSR's fast-learning knowledge pathway the running averages lag the weights, and validation AUC
    # swung by up to 0.05 from epoch to epoch on amazon-arts-office. Recounted over this many batches they do not.
    norm_stats_batches: int = field(
        default=100,
        metadata={
            "help": "STAR: before each validation check, recount the normalization statistics as the average over "
            "this many sampled train batches (0: keep the running averages of training)"
        },
    )
    checks_per_epoch: int = field(
        default=1,
        metadata={"help": "validation checks per epoch; early stopping keeps the best check's weights"},
    )
    seed: int = 0
    threads: int = field(
        default=2,
        metadata={
            "help": "torch threads; the same seed and thread count give a byte-identical model (recorded in the "
            "artifact)"
        },
    )
    # Platt scaling on the validation rows after training (offline/training/calibration.py): scores usable as
    # probabilities, rankings unchanged.
    calibrate: bool = field(
        default=True, metadata={"help": "keep the raw scores: no Platt scaling fitted on the validation rows"}
    )
    eval_batch_size: int = field(default=8192, metadata={"cli": False})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        for name in ("lr", "knowledge_lr_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserFacingError(f"{name} must be a finite number > 0, got {value!r}")
        for name, least in (("checks_per_epoch", 1), ("norm_stats_batches", 0)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= least):
                raise UserFacingError(f"{name} must be an integer >= {least}, got {value!r}")

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainConfig:
        """From the flat form (to_dict's keys, any subset; the rest keep their defaults)."""
        return build_config(cls, values)

    @classmethod
    def flat_keys(cls) -> frozenset[str]:
        return frozenset(config_fields(cls)) - {"knowledge_dim"}

    def to_dict(self) -> dict:
        """The flat form; knowledge_dim is left out (it belongs to the snapshot, not to the training settings)."""
        own = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "wrapper"}
        return {**own, **self.wrapper.model_dump(exclude={"knowledge_dim"})}

    def with_values(self, **values: Any) -> TrainConfig:
        """A copy with some flat values replaced (e.g. compare's per-run backbone, variant and seed)."""
        return TrainConfig.from_flat({**self.to_dict(), **values})


def fill_absent(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored flat config with the fields it predates set to what their absence means (ABSENT_IN_STORED)."""
    return {**ABSENT_IN_STORED, **stored}
