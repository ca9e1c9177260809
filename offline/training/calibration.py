"""Platt scaling: a trained model's scores made usable as probabilities.

Early stopping keeps the epoch with the best validation AUC, and a model that separates well is often
over-confident by then (LLM4MSR's item level on sparse data: test logloss twice the plain backbone's at a higher
AUC). A ranking service's scores are used as probabilities downstream, so after training the logit is mapped to
a * logit + b, with a > 0 and b fitted on the validation rows by maximum likelihood. The map is monotone: AUC, GAUC
and every ranking metric are unchanged. It lives in the model (ModelConfig.calibration), so every scoring path
applies it; the test split is never used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit

from offline.training.metrics import auc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """The fitted map and the validation logloss it changed (recorded in the artifact's train settings)."""

    scale: float
    bias: float
    valid_logloss_before: float
    valid_logloss_after: float

    def to_dict(self) -> dict:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> Calibration | None:
    """(a, b) minimising the logloss of sigmoid(a * logit + b) on held-out rows, or None where it is undefined
    (one class only, or scores that are not finite) or would change the float32 scores' ranking: the model then
    keeps its raw scores."""
    y = np.asarray(labels, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max() or not np.isfinite(x).all():
        return None
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)  # a = exp(log_scale) > 0
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt * log_scale.exp() + bias, yt)
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        before = float(F.binary_cross_entropy_with_logits(xt, yt))
        scale, b = float(log_scale.exp()), float(bias)
        after = float(F.binary_cross_entropy_with_logits(xt * scale + b, yt))
    if not (math.isfinite(scale) and math.isfinite(b)) or after > before:
        return None
    if _ties_scores(x, y, scale, b):
        return None
    return Calibration(scale, b, before, after)


def _ties_scores(logits: np.ndarray, labels: np.ndarray, scale: float, bias: float) -> bool:
    """Whether the map changes the validation AUC of the float32 scores the service returns. In exact arithmetic it
    cannot, but a model that barely ranks gets a scale near 0 (its best calibration is the base rate), and float32
    then rounds distinct scores to the same value: the ranking is lost. Such a model keeps its raw scores."""
    raw = expit(logits.astype(np.float32))
    mapped = expit((logits * scale + bias).astype(np.float32))
    return abs(auc(labels, mapped) - auc(labels, raw)) > 1e-6
