"""The model artifact: what training writes and the ranking service loads (DESIGN section 4).

    <dir>/config.json        ArtifactConfig: backbone, hyper-parameters, scenarios, vocab sizes, knowledge space,
                             metrics, data fingerprint, model_version, sha256 of every file + of the config itself
    <dir>/model.safetensors  weights and buffers (no pickle: loading never executes code from the artifact)
    <dir>/features.json      id -> index maps (vocabularies), item -> category map, user feature table

Every checksum is verified on load; any mismatch is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from shared.dataset.folder import replace_dir_atomically
from shared.errors import UserFacingError
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.features import FeatureEncoder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FEATURES = "features.json"
FORMAT_VERSION = 1


class ArtifactConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format_version: int = FORMAT_VERSION
    model_version: str
    created_at: str
    backbone: str
    backbone_params: dict
    model: ModelConfig
    scenarios: list[str]
    vocab_sizes: dict[str, int]
    llm4msr: bool
    knowledge_source: str  # "llm" | "id" | "random" | "none" (plain backbone)
    levels: list[str]
    placement: str | None = None
    knowledge_space_id: str | None = None
    knowledge_version: str | None = None
    knowledge_dim: int | None = None
    train: dict = {}
    metrics: dict = {}
    data_fingerprint: str
    split_fingerprint: str
    split_config: dict = {}
    files: dict[str, str] = {}
    checksum: str = ""

    def config_checksum(self) -> str:
        """sha256 of the canonical JSON of everything but the checksum field (covers the file checksums too)."""
        payload = self.model_dump(mode="json", exclude={"checksum"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class Artifact:
    config: ArtifactConfig
    model: CTRModel
    encoder: FeatureEncoder
    path: Path | None = None

    @property
    def needs_levels(self) -> frozenset[str]:
        return self.model.needs_levels


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_tensors(model: CTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_artifact(
    out_dir: str | os.PathLike,
    model: CTRModel,
    encoder: FeatureEncoder,
    config_fields: dict,
    overwrite: bool = False,
) -> Path:
    """Writes the folder atomically. config_fields = the ArtifactConfig fields not derived here."""

    def build(tmp: Path) -> None:
        save_file(state_tensors(model), str(tmp / WEIGHTS))
        (tmp / FEATURES).write_text(json.dumps(encoder.to_dict()) + "\n")
        files = {name: _sha256(tmp / name) for name in (WEIGHTS, FEATURES)}
        fields = dict(config_fields)
        fields.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        fields.setdefault("model_version", "")
        cfg = ArtifactConfig(
            **fields,
            model=model.config,
            backbone=model.config.backbone,
            backbone_params=model.config.backbone_params,
            scenarios=encoder.scenarios,
            vocab_sizes=encoder.field_sizes(),
            files=files,
        )
        if not cfg.model_version:
            variant = cfg.knowledge_source if cfg.llm4msr else "plain"
            cfg.model_version = f"{cfg.backbone}-{variant}-{files[WEIGHTS][:12]}"
        cfg.checksum = cfg.config_checksum()
        (tmp / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")

    return replace_dir_atomically(build, out_dir, overwrite=overwrite)


def read_artifact_config(path: str | os.PathLike) -> ArtifactConfig:
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise UserFacingError(f"{path} is not a model artifact (no {CONFIG})")
    try:
        cfg = ArtifactConfig.model_validate_json(file.read_text())
    except ValidationError as exc:
        raise UserFacingError(f"{file}: invalid artifact config: {exc.errors()[0]['msg']}") from None
    if cfg.format_version != FORMAT_VERSION:
        raise UserFacingError(f"{file}: artifact format {cfg.format_version} is not supported ({FORMAT_VERSION})")
    if cfg.checksum != cfg.config_checksum():
        raise UserFacingError(f"{file}: checksum mismatch: config.json was modified after training; refusing it")
    return cfg


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Loads and verifies an artifact; the model comes back in eval mode."""
    path = Path(path)
    cfg = read_artifact_config(path)
    for name in (WEIGHTS, FEATURES):
        if name not in cfg.files:
            raise UserFacingError(f"{path / CONFIG}: no checksum recorded for {name}")
        file = path / name
        if not file.is_file():
            raise UserFacingError(f"artifact {path} is incomplete: {name} is missing")
        if _sha256(file) != cfg.files[name]:
            raise UserFacingError(f"artifact {path}: checksum mismatch for {name} (corrupted or tampered); refusing it")
    encoder = FeatureEncoder.from_dict(json.loads((path / FEATURES).read_text()))
    model = CTRModel(cfg.model)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    except RuntimeError as exc:
        raise UserFacingError(f"artifact {path}: weights do not match its config: {exc}") from None
    model.eval()
    return Artifact(config=cfg, model=model, encoder=encoder, path=path)


def check_knowledge_space(config: ArtifactConfig, space_id: str, where: str = "the knowledge snapshot") -> None:
    """Refuses vectors from another knowledge space (another model, template, pooling or reducer)."""
    if config.knowledge_space_id is None:
        return  # the model reads no LLM vectors
    if space_id != config.knowledge_space_id:
        raise UserFacingError(
            f"knowledge space mismatch: model {config.model_version} was trained on knowledge space "
            f"{config.knowledge_space_id}, but {where} is space {space_id}; rebuild the knowledge with the same "
            "space or retrain the model"
        )
