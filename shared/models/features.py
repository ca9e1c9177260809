"""Categorical feature encoding: string ids -> embedding indices, identical for training and serving.

Fields, in order: user_id, item_id, scenario, then category (if items.csv has it), the interactions' extra columns
and the users.csv feature columns ("user:<column>"). Vocabularies are built from the TRAIN rows (unseen ids map to
the out-of-vocabulary index 0), except the scenario list, which is the dataset's, and the item -> category map,
which covers the whole catalogue (item metadata, not labels), so a cold item still gets its category.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from shared.dataset.folder import Dataset
from shared.dataset.vocab import OOV_INDEX, Vocabulary
from shared.errors import UserFacingError

USER, ITEM, SCENARIO, CATEGORY = "user_id", "item_id", "scenario", "category"
USER_PREFIX = "user:"


class FeatureEncoder:
    """Holds the vocabularies and the side tables (item -> category, user -> user features)."""

    def __init__(
        self,
        scenarios: list[str],
        vocabs: dict[str, Vocabulary],
        catalogue_items: list[str] | None = None,
        catalogue_categories: list[str] | None = None,
        user_features: dict[str, list[str]] | None = None,
    ):
        self.scenarios = list(scenarios)
        self.vocabs = vocabs
        self._scenario_index = pd.Index(self.scenarios)
        self.catalogue_items = catalogue_items or []
        self.catalogue_categories = catalogue_categories or []
        self._catalogue_index = pd.Index(self.catalogue_items)
        # Per user-feature field: the raw value for each user vocabulary token (aligned with vocabs[USER].tokens).
        self.user_features = user_features or {}
        self._user_feature_codes = {
            f: np.concatenate([[OOV_INDEX], self.vocabs[f].encode(values)]) for f, values in self.user_features.items()
        }
        self._category_codes = (
            self.vocabs[CATEGORY].encode(self.catalogue_categories) if CATEGORY in self.vocabs else None
        )
        # Plain dicts for the request path: pandas' get_indexer re-infers the dtype of a large object index on
        # every call (milliseconds for a 40k-item vocabulary); a dict lookup of 500 ids takes microseconds.
        self._dicts = {name: {t: i + 1 for i, t in enumerate(v.tokens)} for name, v in self.vocabs.items()}
        self._catalogue_dict = {t: i for i, t in enumerate(self.catalogue_items)}

    def _codes(self, field: str, values) -> np.ndarray:
        if len(values) > 2048:
            return self.vocabs[field].encode(values)
        lookup = self._dicts[field]
        return np.fromiter((lookup.get(v, OOV_INDEX) for v in values), dtype=np.int64, count=len(values))

    @property
    def extra_fields(self) -> list[str]:
        fixed = {USER, ITEM, SCENARIO, CATEGORY}
        return [f for f in self.vocabs if f not in fixed and not f.startswith(USER_PREFIX)]

    @classmethod
    def fit(cls, dataset: Dataset, train: pd.DataFrame) -> FeatureEncoder:
        vocabs: dict[str, Vocabulary] = {
            USER: Vocabulary.build(USER, train[USER]),
            ITEM: Vocabulary.build(ITEM, train[ITEM]),
            SCENARIO: Vocabulary(SCENARIO, dataset.scenario_names),
        }
        items, cats = None, None
        if CATEGORY in dataset.items.columns:
            cat = dataset.items[CATEGORY].fillna("").astype(str)
            items = dataset.items[ITEM].astype(str).tolist()
            cats = cat.tolist()
            train_cats = cat[dataset.items[ITEM].isin(set(train[ITEM]))]
            vocabs[CATEGORY] = Vocabulary.build(CATEGORY, train_cats)
        for col in dataset.extra_columns:
            if col in train.columns:
                vocabs[col] = Vocabulary.build(col, train[col].astype(str))
        user_features: dict[str, list[str]] = {}
        if dataset.users is not None:
            users = dataset.users.set_index(USER)
            known = vocabs[USER].tokens
            for col in dataset.user_feature_columns:
                field = USER_PREFIX + col
                values = users[col].reindex(known).fillna("").astype(str)
                vocabs[field] = Vocabulary.build(field, values[values != ""])
                user_features[field] = values.tolist()
        return cls(dataset.scenario_names, vocabs, items, cats, user_features)

    def scenario_codes(self, scenarios: Sequence[str] | pd.Series) -> np.ndarray:
        """Scenario position 0..S-1; an unknown scenario is an input error naming the valid ones."""
        codes = self._scenario_index.get_indexer(pd.Index(scenarios, dtype=object))
        if (codes < 0).any():
            bad = pd.Index(scenarios, dtype=object)[codes < 0][0]
            raise UserFacingError(f"unknown scenario {bad!r}; valid scenarios: {', '.join(self.scenarios)}")
        return codes.astype(np.int64)

    def _categories(self, item_ids: Sequence[str] | pd.Series) -> np.ndarray:
        if len(item_ids) > 2048:
            pos = self._catalogue_index.get_indexer(pd.Index(item_ids, dtype=object))
        else:
            get = self._catalogue_dict.get
            pos = np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        out = np.full(len(pos), OOV_INDEX, dtype=np.int64)
        found = pos >= 0
        out[found] = self._category_codes[pos[found]]
        return out

    def _encode(
        self, user_codes: np.ndarray, item_ids, scenario_codes: np.ndarray, extras: Mapping[str, Sequence[str]] | None
    ) -> np.ndarray:
        n = len(item_ids)
        out = np.zeros((n, len(self.vocabs)), dtype=np.int64)
        for j, field in enumerate(self.vocabs):
            if field == USER:
                out[:, j] = user_codes
            elif field == ITEM:
                out[:, j] = self._codes(ITEM, item_ids)
            elif field == SCENARIO:
                out[:, j] = scenario_codes + 1
            elif field == CATEGORY:
                out[:, j] = self._categories(item_ids)
            elif field.startswith(USER_PREFIX):
                out[:, j] = self._user_feature_codes[field][user_codes]
            elif extras is not None and field in extras:
                values = extras[field]
                if len(values) != n:
                    raise UserFacingError(f"feature {field!r} has {len(values)} values for {n} candidates")
                out[:, j] = self._codes(field, [str(v) for v in values])
        return out

    def encode_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Rows -> (fields [n, F] int64, scenario [n] int64). Missing extra columns encode as OOV."""
        scen = self.scenario_codes(frame[SCENARIO].astype(str).to_numpy(dtype=object))
        extras = {f: frame[f] for f in self.extra_fields if f in frame.columns}
        users = self._codes(USER, frame[USER].astype(str).to_numpy(dtype=object))
        fields = self._encode(users, frame[ITEM].astype(str).to_numpy(dtype=object), scen, extras)
        return fields, scen

    def encode_request(
        self,
        scenario: str,
        user_id: str,
        item_ids: Sequence[str],
        features: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(item_ids)
        if scenario not in self._dicts[SCENARIO]:
            self.scenario_codes([scenario])  # raises the error naming the valid scenarios
        scen = np.full(n, self._dicts[SCENARIO][scenario] - 1, dtype=np.int64)
        users = np.full(n, self._dicts[USER].get(str(user_id), OOV_INDEX), dtype=np.int64)  # one lookup, not n
        return self._encode(users, [str(i) for i in item_ids], scen, features), scen

    def field_sizes(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.vocabs.items()}

    def to_dict(self) -> dict:
        return {
            "scenarios": self.scenarios,
            "vocabs": [v.to_dict() for v in self.vocabs.values()],
            "catalogue_items": self.catalogue_items,
            "catalogue_categories": self.catalogue_categories,
            "user_features": self.user_features,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureEncoder:
        vocabs = {v["name"]: Vocabulary.from_dict(v) for v in data["vocabs"]}
        return cls(
            data["scenarios"],
            vocabs,
            data.get("catalogue_items"),
            data.get("catalogue_categories"),
            data.get("user_features"),
        )
