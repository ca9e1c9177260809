"""Scoring with a loaded artifact: the one code path shared by the ranking service and offline evaluation.

`RequestScorer.score` handles one request (one user, one scenario, N candidates): scenario and user knowledge are
passed once ([d]) and the meta layers' weights are generated once and broadcast over the N candidates.
`score_rows` scores a labelled frame in batches (evaluation). Both run the same model in eval/inference mode, and
every operation is row-wise, so a candidate gets the same score in either path (within float tolerance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from shared.artifact import Artifact, check_knowledge_space
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.request_graphs import RequestGraphs


@dataclass
class RequestKnowledge:
    """Raw knowledge vectors for one request (float32, the knowledge space's dimension).

    A level the model does not use may be None. An item whose vector is unknown may be a row of NaN: the model
    treats it as the level's average vector.
    """

    scenario_vec: np.ndarray | None = None  # [d]
    user_vec: np.ndarray | None = None  # [d]
    item_vecs: np.ndarray | None = None  # [N, d], rows aligned with item_ids
    # Optional instead of item_vecs: the same rows already passed through RequestScorer.reduce_items (a ranker
    # can reduce its in-memory item table once per knowledge version; saves an [N, d] x [d, r] product per request).
    # A NaN row = unknown item, as in item_vecs.
    item_reduced: np.ndarray | None = None  # [N, r]


class KnowledgeLookup(Protocol):
    """Where score_rows gets vectors: [n, d] float32 per level for the given ids."""

    def vectors(self, level: str, ids: Sequence[str]) -> np.ndarray: ...


class SnapshotLookup:
    """Vectors from a knowledge snapshot: unknown user -> the snapshot's default user vector, unknown item -> NaN
    (= average), unknown scenario -> error (a scenario always has knowledge)."""

    def __init__(self, snapshot: KnowledgeSnapshot):
        self.snapshot = snapshot
        self.space_id = snapshot.space.id

    def vectors(self, level: str, ids: Sequence[str]) -> np.ndarray:
        table = self.snapshot.table(level)
        if level == "user":
            vec, _ = table.lookup(ids, default=self.snapshot.default_user())
            return vec
        vec, found = table.lookup(ids)
        if level == "scenario" and not found.all():
            missing = pd.Index(ids)[~found][0]
            raise UserFacingError(f"knowledge snapshot {self.snapshot.path} has no vector for scenario {missing!r}")
        vec[~found] = np.nan
        return vec


class RequestScorer:
    """Scores candidates with an artifact's model; thread-safe for concurrent score() calls.

    traced=True runs score() through TorchScript graphs of the request forward (shared/request_graphs.py), each
    checked against the eager forward before use; the model is then frozen (no gradients) for good.
    """

    def __init__(self, artifact: Artifact, traced: bool = False):
        self.artifact = artifact
        self.model = artifact.model.eval()
        self.encoder = artifact.encoder
        self.needs_levels: frozenset[str] = artifact.model.needs_levels
        self.dim = artifact.config.knowledge_dim
        wrapper = artifact.model.wrapper
        self.reduced_dim = wrapper.reduced_dim if wrapper is not None else None
        # The artifact's weights never change after loading: fold the wrapper once for one-request scoring.
        self.request_path = wrapper.fold_for_requests() if wrapper is not None else None
        self.graphs: RequestGraphs | None = None
        if traced:
            self.model.requires_grad_(False)  # a traced graph holds the weights as constants
            self.graphs = RequestGraphs(self._forward)

    def _forward(
        self,
        fields: torch.Tensor,
        scenario: torch.Tensor,
        knowledge: dict[str, torch.Tensor | None],
        item_reduced: torch.Tensor | None,
    ) -> torch.Tensor:
        """The eager forward of one request: the folded wrapper, or the model itself when nothing is folded (no LLM
        knowledge: the plain backbone, the id/random controls)."""
        if self.request_path is not None:
            return self.model.forward_request(fields, scenario, self.request_path, knowledge, item_reduced)
        return self.model(fields, scenario, knowledge)

    @torch.inference_mode()
    def reduce_items(self, item_vecs: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Raw item knowledge [n, d] -> [n, r] (NaN rows = unknown items allowed), for RequestKnowledge.item_reduced.

        Deterministic per knowledge version and model: compute once when a version is loaded, not per request.
        """
        if "item" not in self.needs_levels:
            raise UserFacingError(f"model {self.artifact.config.model_version} does not use item knowledge")
        vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise UserFacingError(f"item knowledge has shape {vecs.shape}, expected (n, {self.dim})")
        out = np.empty((len(vecs), self.reduced_dim), dtype=np.float32)
        for start in range(0, len(vecs), batch_size):
            chunk = torch.tensor(vecs[start : start + batch_size])
            out[start : start + len(chunk)] = self.artifact.model.wrapper.reduce("item", chunk).numpy()
        return out

    def _vector(self, level: str, value: np.ndarray | None, rows: int | None) -> torch.Tensor | None:
        if level not in self.needs_levels:
            return None
        if value is None:
            raise UserFacingError(f"model {self.artifact.config.model_version} needs {level}-level knowledge")
        arr = np.array(value, dtype=np.float32)  # a contiguous writable copy: callers pass views, read-only arrays
        expected = (self.dim,) if rows is None else (rows, self.dim)
        if arr.shape != expected:
            raise UserFacingError(f"{level} knowledge has shape {arr.shape}, expected {expected}")
        return torch.from_numpy(arr.reshape(-1, self.dim))

    @torch.inference_mode()
    def score(
        self,
        scenario: str,
        user_id: str,
        item_ids: Sequence[str],
        knowledge: RequestKnowledge,
        features: Mapping[str, Sequence[str]] | None = None,
    ) -> np.ndarray:
        """Click probabilities [N] for one user's candidates in one scenario."""
        n = len(item_ids)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        fields, scen = self.encoder.encode_request(scenario, user_id, item_ids, features)
        item_reduced = None
        if "item" in self.needs_levels and knowledge.item_reduced is not None:
            items = np.array(knowledge.item_reduced, dtype=np.float32)  # a writable copy for torch
            if items.shape != (n, self.reduced_dim):
                raise UserFacingError(
                    f"reduced item knowledge has shape {items.shape}, expected {(n, self.reduced_dim)}"
                )
            item_reduced = torch.from_numpy(items)
        kn = {
            "scenario": self._vector("scenario", knowledge.scenario_vec, None),
            "user": self._vector("user", knowledge.user_vec, None),
            "item": None if item_reduced is not None else self._vector("item", knowledge.item_vecs, n),
        }
        forward = self.graphs or self._forward
        logits = forward(torch.from_numpy(fields), torch.from_numpy(scen), kn, item_reduced)
        return torch.sigmoid(logits).numpy().astype(np.float32)

    @torch.inference_mode()
    def score_rows(
        self, frame: pd.DataFrame, knowledge_lookup: KnowledgeLookup | None, batch_size: int = 4096
    ) -> np.ndarray:
        """Probabilities for every row of a frame with user_id, item_id, scenario (+ extra feature columns)."""
        if self.needs_levels and knowledge_lookup is None:
            raise UserFacingError(
                f"model {self.artifact.config.model_version} needs knowledge vectors "
                f"({', '.join(sorted(self.needs_levels))}); pass --knowledge SNAPSHOT"
            )
        space = getattr(knowledge_lookup, "space_id", None)
        if self.needs_levels and space is not None:
            check_knowledge_space(self.artifact.config, space)
        fields, scen = self.encoder.encode_frame(frame)
        out = np.zeros(len(frame), dtype=np.float32)
        id_cols = {"scenario": "scenario", "user": "user_id", "item": "item_id"}
        for start in range(0, len(frame), batch_size):
            stop = min(start + batch_size, len(frame))
            chunk = frame.iloc[start:stop]
            kn = {}
            for level in self.needs_levels:
                ids = chunk[id_cols[level]].astype(str).tolist()
                kn[level] = torch.from_numpy(np.ascontiguousarray(knowledge_lookup.vectors(level, ids), np.float32))
            logits = self.model(torch.from_numpy(fields[start:stop]), torch.from_numpy(scen[start:stop]), kn)
            out[start:stop] = torch.sigmoid(logits).numpy()
        return out
