"""The per-user fit cutoff of the leak-free protocol: one definition for the knowledge build and the trainer.

A user vector built from all train positives was built from the very item a train row predicts, which a valid/test
row never is. So the build also writes "fit" user vectors from each user's EARLY train history only, and the
trainer fits the knowledge pathway on the LATE train rows with them (docs/architecture.md, Knowledge snapshot).
Early means: the first `floor(share * n)` of the user's n observed train rows in time order, with the sampled
negatives that belong to them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from offline.data.split import Split
from shared.dataset.folder import SEQ
from shared.errors import UserFacingError

DEFAULT_FIT_SHARE = 0.7
# floor(0.57 * 100) would be 56 in binary floating point: the product is nudged up by this much before the floor.
_FLOOR_EPSILON = 1e-9


def check_fit_share(share: float) -> float:
    """share itself; a clear error outside (0, 1): 0 would leave every user without history, 1 would leak."""
    if not 0.0 < float(share) < 1.0:
        raise UserFacingError(f"fit share must be in (0, 1) (the early part of each user's train history), got {share}")
    return float(share)


def early_train_mask(split: Split, share: float) -> np.ndarray:
    """Bool per row of split.train: True for the user's early rows (the first floor(share * n_observed) observed
    rows in time order and their sampled negatives), False for the late ones."""
    share = check_fit_share(share)
    train = split.train
    observed = ~train["sampled"].to_numpy(dtype=bool)
    users = train["user_id"].to_numpy()[observed]
    # The split orders each user's rows by time, so the rank among the user's observed rows is the time order.
    observed_users = pd.Series(users)
    rank = observed_users.groupby(observed_users, sort=False).cumcount().to_numpy()
    n_observed = observed_users.groupby(observed_users, sort=False).transform("size").to_numpy()
    early_observed = rank < np.floor(share * n_observed + _FLOOR_EPSILON)
    mask = np.zeros(len(train), dtype=bool)
    mask[observed] = early_observed
    if not observed.all():
        # A sampled negative shares the user and _seq of the positive it was drawn for.
        early_keys = pd.MultiIndex.from_arrays([users[early_observed], train[SEQ].to_numpy()[observed][early_observed]])
        sampled = ~observed
        sampled_keys = pd.MultiIndex.from_arrays([train["user_id"].to_numpy()[sampled], train[SEQ].to_numpy()[sampled]])
        mask[sampled] = sampled_keys.isin(early_keys)
    return mask


def fit_history(split: Split, share: float) -> pd.DataFrame:
    """What a fit prompt may show: the early rows that are observed positives, with the columns and order of
    split.train_positives()."""
    early = early_train_mask(split, share)
    positives = split.train_positives()
    return positives[early[split.train.index.get_indexer(positives.index)]]
