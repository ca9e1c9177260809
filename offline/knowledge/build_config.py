"""What a knowledge build depends on; the CLI fills it from its options (offline/knowledge/cli.py), the refresh job
from its own. Re-exported as offline.knowledge.build.KnowledgeConfig."""

from __future__ import annotations

from argparse import ArgumentTypeError
from dataclasses import dataclass, field

from offline.data.fit_cutoff import DEFAULT_FIT_SHARE
from offline.data.split import SplitConfig
from offline.knowledge.backends.base import MODES, POOLINGS, BackendConfig
from offline.knowledge.executor import ExecutorConfig
from offline.knowledge.executors import EXECUTORS
from offline.knowledge.options import cli
from offline.knowledge.prompts import PromptConfig
from shared.errors import UserFacingError

AUTO = "auto"
# --reduce-dim auto: the width a new knowledge space is reduced to (SmolLM2's 576 -> 256: an int8 user vector in
# Redis then costs about a sixth of a float32 one; a 7B model's 3,584-4,096 -> 256: about a sixtieth) ...
AUTO_REDUCE_DIM = 256
# ... when the PCA has at least this many vectors per kept dimension to be fitted on (a PCA fitted on fewer would
# describe those vectors, not the next refresh's).
AUTO_MIN_VECTORS_PER_DIM = 4


def parse_reduce_dim(value: int | str | None, error: type[Exception]) -> int | str | None:
    """A --reduce-dim value: a positive int, None ('none') or AUTO; anything else raises error."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("none", AUTO):
            return None if text == "none" else AUTO
        if not text.lstrip("-").isdigit():
            raise error(f"--reduce-dim takes a number, 'none' or 'auto', not {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"--reduce-dim must be a positive number, 'none' or 'auto', got {value!r}")
    return value


@dataclass(frozen=True)
class KnowledgeConfig:
    """Everything a build depends on; each scalar field is an option of `llm4msr knowledge build`."""

    data: str = field(metadata=cli(help="dataset folder"))
    out: str = field(metadata=cli(help="knowledge root: versions are written under it, LATEST points"))
    backend: BackendConfig = field(default_factory=BackendConfig)
    mode: str = field(default="encode", metadata=cli(choices=MODES))
    pooling: str = field(default="mean", metadata=cli(choices=POOLINGS))
    # A name in the executor registry (offline/knowledge/executors.py).
    engine: str = field(default="local", metadata=cli(choices=EXECUTORS.names))
    # The engine's own settings, an instance of the config class it is registered with; None = that class's defaults.
    engine_options: ExecutorConfig | None = field(default=None, metadata=cli(hidden=True))
    split: SplitConfig = field(default_factory=SplitConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    # PCA to this many dimensions (None: vectors as the LLM gives them); the fitted reducer defines the knowledge
    # space and is reused by refreshes. "auto" is resolved when the build is planned (build_plan.resolve_reduce_dim).
    reduce_dim: int | str | None = field(
        default=AUTO,
        metadata=cli(
            help=f"PCA to this many dimensions (defines the knowledge space), 'none', or 'auto' (default): the space "
            f"of the latest version when it has the same LLM and prompts, else {AUTO_REDUCE_DIM} when the LLM is "
            f"wider and the build has at least {AUTO_MIN_VECTORS_PER_DIM} vectors per kept dimension",
            parse=lambda text: parse_reduce_dim(text, ArgumentTypeError),
        ),
    )
    # Fit a new reducer even if the previous version has one (a new space: models must be retrained).
    new_space: bool = field(default=False, metadata=cli(help="fit a new reducer even if the last version has one"))
    # Reuse vectors of unchanged prompts from the previous version in --out.
    incremental: bool = field(
        default=True, metadata=cli(flag="--full", help="recompute every vector (no incremental reuse)")
    )
    shard_size: int = field(default=256, metadata=cli(help="rows per resumable shard"))
    # The leak-free protocol's fit user vectors: prompts from each user's earliest share of train interactions
    # (offline/data/fit_cutoff.py), stored as users_fit.parquet for training only. 0 = none (old protocol).
    fit_share: float = field(
        default=DEFAULT_FIT_SHARE,
        metadata=cli(
            help=f"also build training-only user vectors from this earliest share of each user's train history "
            f"(default {DEFAULT_FIT_SHARE}; 0: none, the old protocol)"
        ),
    )
    progress: bool = True

    @property
    def builds_fit_vectors(self) -> bool:
        return self.fit_share > 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserFacingError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        options_class = EXECUTORS.get(self.engine).config_class
        if self.engine_options is None:
            object.__setattr__(self, "engine_options", options_class())
        elif not isinstance(self.engine_options, options_class):
            raise UserFacingError(
                f"engine {self.engine!r} takes {options_class.__name__} options, "
                f"not {type(self.engine_options).__name__}"
            )
        object.__setattr__(self, "reduce_dim", parse_reduce_dim(self.reduce_dim, UserFacingError))
        if self.shard_size < 1:
            raise UserFacingError("shard size must be positive")
        if self.fit_share != 0 and not 0 < self.fit_share < 1:
            raise UserFacingError(f"--fit-share must be 0 (no fit user vectors) or in (0, 1), got {self.fit_share}")
        if self.backend.max_length < 1:
            raise UserFacingError(f"--max-length must be positive, got {self.backend.max_length}")
