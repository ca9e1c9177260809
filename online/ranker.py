"""The loaded model: artifact + request scorer, with what the HTTP layer needs to know about it.

One `Ranker` is immutable once built; an admin reload builds a new one and swaps the reference, so a request that
started on the old model finishes on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import UserFacingError

if TYPE_CHECKING:  # torch-heavy modules, imported when a model is loaded
    from online.knowledge import KnowledgeVersion
    from shared.artifact import Artifact
    from shared.scoring import RequestKnowledge, RequestScorer

log = logging.getLogger(__name__)


class KnowledgeDataError(UserFacingError):
    """The served knowledge, not the request, cannot feed the model (e.g. a vector of the wrong length): the
    service answers 503 for it, never 500, and never blames the client with a 4xx."""


def cap_torch_threads(n: int) -> None:
    """Worker processes use the cores; more intra-op threads per worker only add contention under load."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process, before any parallel work
        pass


@dataclass
class Ranker:
    artifact_dir: Path
    artifact: Artifact
    scorer: RequestScorer
    model_version: str
    knowledge_space_id: str | None
    scenarios: tuple[str, ...]
    needs_levels: frozenset[str]
    backbone: str
    # The candidate fields the model was trained on (FeatureEncoder.extra_fields): the only ones a request reads.
    feature_fields: tuple[str, ...] = ()
    _known_items: frozenset[str] = frozenset()
    _item_tables: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # knowledge version -> table
    _item_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, artifact_dir: str | Path, traced: bool = True) -> Ranker:
        """traced: requests run through TorchScript graphs of the forward, built and checked in warm_up (one per
        scenario and knowledge layout; shared/request_graphs.py); False runs the eager forward."""
        from shared.artifact import load_artifact
        from shared.scoring import RequestScorer

        path = Path(artifact_dir)
        if not path.exists():
            raise UserFacingError(f"model artifact not found: {path}")
        artifact = load_artifact(path)
        scorer = RequestScorer(artifact, traced=traced)
        cfg = artifact.config
        needs = frozenset(scorer.needs_levels)
        space = getattr(cfg, "knowledge_space_id", None) if needs else None
        ranker = cls(
            artifact_dir=path,
            artifact=artifact,
            scorer=scorer,
            model_version=str(cfg.model_version),
            knowledge_space_id=space or None,
            scenarios=tuple(cfg.scenarios),
            needs_levels=needs,
            backbone=str(getattr(cfg, "backbone", "")),
            feature_fields=tuple(scorer.encoder.extra_fields),
            _known_items=frozenset(vocab.tokens) if (vocab := scorer.encoder.vocabs.get("item_id")) else frozenset(),
        )
        started = time.perf_counter()
        ranker.warm_up()
        graphs = scorer.graphs.graphs if scorer.graphs is not None else {}
        log.info(
            "loaded model %s (%s, levels %s) from %s; forward %s, warm-up %.2f s",
            ranker.model_version,
            ranker.backbone,
            sorted(needs) or "none",
            path,
            f"traced ({sum(graphs.values())} of {len(graphs)} graphs checked out)" if graphs else "eager",
            time.perf_counter() - started,
        )
        return ranker

    @property
    def needs_user(self) -> bool:
        return "user" in self.needs_levels

    @property
    def needs_items(self) -> bool:
        return "item" in self.needs_levels

    @property
    def needs_scenario(self) -> bool:
        return "scenario" in self.needs_levels

    @property
    def uses_knowledge(self) -> bool:
        return bool(self.needs_levels)

    def oov_count(self, item_ids: Sequence[str]) -> int:
        """Distinct candidates whose id the model never saw (they get the out-of-vocabulary embedding)."""
        return len(set(item_ids).difference(self._known_items))

    def score(
        self,
        scenario: str,
        user_id: str,
        item_ids: Sequence[str],
        knowledge: RequestKnowledge,
        features: Mapping[str, Sequence[str | None]] | None = None,
    ) -> np.ndarray:
        """One batched forward for all candidates (the meta layers are generated once per request).

        Knowledge of the wrong shape raises KnowledgeDataError (a data fault); any other UserFacingError from the
        scorer is about the request's input. (RequestScorer.score runs under inference mode itself.)"""
        self.check_knowledge(knowledge, len(item_ids))
        scores = self.scorer.score(scenario, user_id, item_ids, knowledge, features=features)
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def check_knowledge(self, knowledge: RequestKnowledge, n: int) -> None:
        """Raises KnowledgeDataError naming the level when a vector the model reads does not have its dimension."""
        dim, reduced = self.scorer.dim, self.scorer.reduced_dim
        wanted = [
            ("scenario", knowledge.scenario_vec, (dim,)),
            ("user", knowledge.user_vec, (dim,)),
            ("item", knowledge.item_vecs, (n, dim)),
            ("item", knowledge.item_reduced, (n, reduced)),
        ]
        for level, value, shape in wanted:
            got = np.shape(value)
            if level in self.needs_levels and value is not None and got != shape:
                if got and got[:-1] == shape[:-1]:  # only the vector length is wrong
                    raise KnowledgeDataError(
                        f"the {level} knowledge vector has {got[-1]} values, the model expects {shape[-1]}"
                    )
                raise KnowledgeDataError(f"the {level} knowledge has shape {got}, the model expects {shape}")

    def has_reduced_items(self, kv: KnowledgeVersion) -> bool:
        """Whether `reduced_items(kv)` is already computed (its first call reduces the whole catalogue)."""
        return kv.version in self._item_tables

    def reduced_items(self, kv: KnowledgeVersion) -> np.ndarray:
        """The version's in-memory item vectors through this model's frozen reduction ([n, r], rows aligned with
        kv.items), computed once per knowledge version: a request then gathers 500 small rows instead of reducing
        500 raw ones. The two newest versions are kept (requests in flight may still use the previous one)."""
        table = self._item_tables.get(kv.version)
        if table is None:
            with self._item_lock:
                table = self._item_tables.get(kv.version)
                if table is None:
                    started = time.perf_counter()
                    table = self.scorer.reduce_items(kv.items.matrix)
                    newest = list(self._item_tables.items())[-1:]
                    self._item_tables = {**dict(newest), kv.version: table}
                    log.info(
                        "reduced %d item vectors of knowledge %s for model %s in %.2f s",
                        len(table),
                        kv.version,
                        self.model_version,
                        time.perf_counter() - started,
                    )
        return table

    def warm_up(self) -> None:
        """First forwards allocate and pick kernels, and build the traced graph of every scenario and knowledge
        layout (raw item vectors, or reduced rows from an in-memory catalogue); do that before the first request."""
        from shared.scoring import RequestKnowledge

        dim, reduced = self._knowledge_dim(), self.scorer.reduced_dim
        calls = [(self.scenarios[0], n) for n in (1, 500)] + [(scenario, 100) for scenario in self.scenarios]
        for (scenario, n), item_reduced in itertools.product(calls, (False, True) if self.needs_items else (False,)):
            kn = RequestKnowledge(
                scenario_vec=np.zeros(dim, np.float32) if self.needs_scenario else None,
                user_vec=np.zeros(dim, np.float32) if self.needs_user else None,
                item_vecs=np.zeros((n, dim), np.float32) if self.needs_items and not item_reduced else None,
                item_reduced=np.zeros((n, reduced), np.float32) if item_reduced else None,
            )
            self.score(scenario, "__warmup", [f"__warmup_{i}" for i in range(n)], kn)

    def _knowledge_dim(self) -> int:
        cfg = self.artifact.config
        for name in ("knowledge_dim", "k_dim", "knowledge_in_dim"):
            value = getattr(cfg, name, None)
            if value:
                return int(value)
        return 0
