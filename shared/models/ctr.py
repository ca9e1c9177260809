"""The CTR model: field embeddings -> (optional LLM4MSR wrapper) -> backbone -> one logit per row."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from torch import nn

from shared.models.backbones import build_backbone
from shared.models.features import ITEM, SCENARIO, USER
from shared.models.llm4msr import LLM4MSR, LLM4MSRConfig, RequestPath
from shared.models.llm4msr_config import fill_absent_if_stored

# ModelConfig fields newer than the first artifacts, in the order they were added, with the value their absence
# means in a stored config (as ABSENT_MEANS for the wrapper's): raw scores, and the embeddings' init of that time.
MODEL_ABSENT_MEANS: dict[str, Any] = {"calibration": (1.0, 0.0), "embed_init_std": 0.05}


class ModelConfig(BaseModel):
    """Everything needed to rebuild the network (the weights come from model.safetensors)."""

    model_config = ConfigDict(extra="forbid")
    # (field name, vocabulary size incl. OOV) in input order; a list, not a dict, because config.json is
    # written with sorted keys and the order defines the embedding layout.
    fields: list[tuple[str, int]]
    n_scenarios: int
    embed_dim: int = 16
    # Std of the normal init of the field embeddings. Small, so that an ID seen only a few times in training stays
    # near a neutral vector instead of keeping random noise the network reads as signal (0.05 before: 1e-4 was
    # better on validation AUC for 10 of 12 plain backbone x dataset pairs, by up to 0.025). Only the init of a
    # new model; a loaded model has its trained weights.
    embed_init_std: float = Field(default=1e-4, gt=0)
    backbone: str = "star"
    backbone_params: dict = {}
    llm4msr: LLM4MSRConfig | None = None
    # (a, b): the score is sigmoid(a * logit + b), Platt scaling fitted on validation after training
    # (offline/training/calibration.py); (1, 0) = the raw logit, as in models trained before it existed.
    calibration: tuple[float, float] = (1.0, 0.0)

    @model_validator(mode="before")
    @classmethod
    def _absent_in_stored_config(cls, data: Any, info: ValidationInfo) -> Any:
        """A stored config without a newer field holds the model of its time, not today's default."""
        return fill_absent_if_stored(data, info, MODEL_ABSENT_MEANS)


class CTRModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        names = [name for name, _ in config.fields]
        sizes = torch.tensor([size for _, size in config.fields])
        field_sizes = dict(config.fields)
        # One table for all fields (offsets per field): one lookup per batch instead of F.
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.embedding = nn.Embedding(int(sizes.sum()), config.embed_dim)
        nn.init.normal_(self.embedding.weight, std=config.embed_init_std)
        self.pos = {USER: names.index(USER), ITEM: names.index(ITEM), SCENARIO: names.index(SCENARIO)}
        x_dim = len(names) * config.embed_dim
        self.wrapper: LLM4MSR | None = None
        if config.llm4msr is not None:
            self.wrapper = LLM4MSR(config.llm4msr, x_dim, config.n_scenarios, field_sizes[USER], field_sizes[ITEM])
            x_dim = self.wrapper.x_dim
        self.backbone = build_backbone(config.backbone, config.backbone_params, x_dim, config.n_scenarios)
        self._calibration: tuple[float, float] | None = None
        self.set_calibration(*config.calibration)

    def set_calibration(self, scale: float, bias: float) -> None:
        """Maps every logit to scale * logit + bias from now on (scale > 0: the ranking is unchanged); recorded in
        the config, so a saved artifact keeps it."""
        if not scale > 0:
            raise ValueError(f"calibration scale must be positive, got {scale}")
        self.config = self.config.model_copy(update={"calibration": (float(scale), float(bias))})
        self._calibration = None if (scale, bias) == (1.0, 0.0) else (float(scale), float(bias))

    @property
    def needs_levels(self) -> frozenset[str]:
        return self.wrapper.needs_levels if self.wrapper is not None else frozenset()

    def forward(
        self,
        fields: torch.Tensor,
        scenario: torch.Tensor,
        knowledge: dict[str, torch.Tensor | None] | None = None,
        reduced: bool = False,
    ) -> torch.Tensor:
        """fields [B, F] vocabulary indices, scenario [B] in 0..S-1, knowledge {level: [B or 1, d]} -> logits [B]."""
        x = self._embed(fields)
        z = None
        if self.wrapper is not None:
            index = {
                "scenario": scenario,
                "user": fields[:, self.pos[USER]],
                "item": fields[:, self.pos[ITEM]],
            }
            x, z = self.wrapper(x, index, knowledge or {}, reduced)
        return self._logit(x, scenario, z)

    def forward_request(
        self,
        fields: torch.Tensor,
        scenario: torch.Tensor,
        path: RequestPath,
        raw: dict[str, torch.Tensor | None],
        item_reduced: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() for one request through the wrapper folded by LLM4MSR.fold_for_requests (eval only)."""
        x, z = path(self._embed(fields), raw, item_reduced)
        return self._logit(x, scenario, z)

    def _embed(self, fields: torch.Tensor) -> torch.Tensor:
        return self.embedding(fields + self.offsets).flatten(1)

    def _logit(self, x: torch.Tensor, scenario: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        logit = self.backbone(x, scenario)
        if z is not None:
            logit = logit + z
        if self._calibration is not None:
            scale, bias = self._calibration
            logit = logit * scale + bias
        return logit
