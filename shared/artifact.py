"""The model artifact: what training writes and the ranking service loads (docs/architecture.md, Model artifact).

    <dir>/config.json        ArtifactConfig: backbone, hyper-parameters, scenarios, vocab sizes, knowledge space,
                             metrics, data fingerprint, model_version, sha256 of every file + of the config itself,
                             and an HMAC signature when a key was set at save time
    <dir>/model.safetensors  weights and buffers (no pickle: loading never executes code from the artifact)
    <dir>/features.json      id -> index maps (vocabularies), item -> category map, user feature table

Every checksum is verified on load; any mismatch is refused with a clear error. The checksums live beside the
files they cover, so they detect corruption (a truncated copy, a flipped bit, a hand edit), not tampering: whoever
can write the folder can recompute them. Signing covers that: with LLM4MSR_ARTIFACT_KEY (or LLM4MSR_ARTIFACT_KEY_FILE,
a file holding the key) set at save time, config.json gets `signature` = HMAC-SHA256(key, config checksum), and the
config checksum covers every file's sha256. With the key set at load time, an artifact without a valid signature is
refused; without a key, artifacts load as before (signed or not) and only corruption is detected.

Artifacts written before a wrapper setting existed stay loadable and keep their checksum: config.json is read with
the stored-config context (shared/models/llm4msr_config.py: a missing newer field means the model of that time,
e.g. gate "none"), and the checksum leaves such a field out while it holds that value. A newer field of the model
config (`MODEL_ABSENT_MEANS`, in the order they were added) is read the same way, and the checksum is accepted as
an artifact of any earlier field set has it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from shared.atomic import replace_dir_atomically
from shared.errors import UserFacingError
from shared.models.ctr import MODEL_ABSENT_MEANS, CTRModel, ModelConfig
from shared.models.features import FeatureEncoder
from shared.models.llm4msr_config import ABSENT_MEANS, STORED_CONFIG

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FEATURES = "features.json"
FORMAT_VERSION = 1
KEY_ENV = "LLM4MSR_ARTIFACT_KEY"
KEY_FILE_ENV = "LLM4MSR_ARTIFACT_KEY_FILE"
MIN_KEY_BYTES = 32
SIGNATURE_PREFIX = "hmac-sha256:"


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
    signature: str = ""  # "hmac-sha256:<hex>" over `checksum`, or "" when saved without a key

    def config_checksum(self, newer_left_out: int = 0) -> str:
        """sha256 of the canonical JSON of everything but checksum and signature (covers the file checksums too;
        unsigned artifacts written before signing existed keep their checksum). newer_left_out = k: the checksum
        as an artifact written before the last k model fields of MODEL_ABSENT_MEANS existed has it (those of them
        holding the value their absence means are left out)."""
        payload = self.model_dump(mode="json", exclude={"checksum", "signature"})
        newer = list(MODEL_ABSENT_MEANS.items())[len(MODEL_ABSENT_MEANS) - newer_left_out :]
        for name, absent in json.loads(json.dumps(newer)):
            if payload["model"].get(name) == absent:
                del payload["model"][name]
        wrapper = payload["model"].get("llm4msr")
        if wrapper is not None:  # a newer setting at the value its absence means: as if it were not there
            payload["model"]["llm4msr"] = {
                k: v for k, v in wrapper.items() if k not in ABSENT_MEANS or v != ABSENT_MEANS[k]
            }
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


def signing_key() -> bytes | None:
    """The HMAC key from LLM4MSR_ARTIFACT_KEY or the file named by LLM4MSR_ARTIFACT_KEY_FILE; None when neither is
    set. A file's trailing newline is not part of the key."""
    value, file = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if value and file:
        raise UserFacingError(f"set only one of {KEY_ENV} and {KEY_FILE_ENV}")
    if file:
        try:
            key = Path(file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UserFacingError(f"{KEY_FILE_ENV}={file}: cannot read the key file ({exc.strerror})") from None
        where = f"the key file {file} ({KEY_FILE_ENV})"
    elif value is not None:
        key, where = value.encode(), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise UserFacingError(
            f"artifact signing key from {where} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key


def sign(checksum: str, key: bytes) -> str:
    return SIGNATURE_PREFIX + hmac.new(key, checksum.encode(), hashlib.sha256).hexdigest()


def verify_signature(cfg: ArtifactConfig, file: Path, key: bytes | None) -> None:
    """With a key, refuses a config whose signature is missing or was not made with that key."""
    if key is None:
        return
    if not cfg.signature:
        raise UserFacingError(
            f"{file}: the artifact is not signed, but {KEY_ENV}/{KEY_FILE_ENV} is set; refusing it "
            "(save it again with the key set, or unset the key to accept unsigned artifacts)"
        )
    if not hmac.compare_digest(cfg.signature, sign(cfg.checksum, key)):
        raise UserFacingError(
            f"{file}: invalid signature: the artifact was modified after signing or signed with another key; "
            "refusing it"
        )


def build_config(
    model: CTRModel, encoder: FeatureEncoder, config_fields: dict, files: dict[str, str]
) -> ArtifactConfig:
    """The ArtifactConfig of a trained model (checksum set, not signed); config_fields = the fields not derived
    here, files = sha256 per file (empty for an artifact that lives only in memory)."""
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
        cfg.model_version = f"{cfg.backbone}-{variant}-{files.get(WEIGHTS, 'in-memory')[:12]}"
    cfg.checksum = cfg.config_checksum()
    return cfg


def in_memory_artifact(model: CTRModel, encoder: FeatureEncoder, config_fields: dict) -> Artifact:
    """A trained model as an Artifact without writing it, so that it can be scored through shared.scoring exactly
    as a loaded one (compare evaluates its runs this way)."""
    return Artifact(config=build_config(model, encoder, config_fields, {}), model=model.eval(), encoder=encoder)


def state_tensors(model: CTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_artifact(
    out_dir: str | os.PathLike,
    model: CTRModel,
    encoder: FeatureEncoder,
    config_fields: dict,
    overwrite: bool = False,
) -> Path:
    """Writes the folder atomically, signed when a key is set (see the module doc). config_fields = the
    ArtifactConfig fields not derived here."""
    key = signing_key()  # a bad key fails before any work

    def build(tmp: Path) -> None:
        save_file(state_tensors(model), str(tmp / WEIGHTS))
        (tmp / FEATURES).write_text(json.dumps(encoder.to_dict()) + "\n")
        cfg = build_config(model, encoder, config_fields, {name: _sha256(tmp / name) for name in (WEIGHTS, FEATURES)})
        if key is not None:
            cfg.signature = sign(cfg.checksum, key)
        (tmp / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")

    return replace_dir_atomically(build, out_dir, overwrite=overwrite)


def read_artifact_config(path: str | os.PathLike) -> ArtifactConfig:
    """The verified config: its checksum, and its signature when a key is set (see the module doc)."""
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise UserFacingError(f"{path} is not a model artifact (no {CONFIG})")
    try:
        cfg = ArtifactConfig.model_validate_json(file.read_text(), context={STORED_CONFIG: True})
    except ValidationError as exc:
        raise UserFacingError(f"{file}: invalid artifact config: {exc.errors()[0]['msg']}") from None
    if cfg.format_version != FORMAT_VERSION:
        raise UserFacingError(f"{file}: artifact format {cfg.format_version} is not supported ({FORMAT_VERSION})")
    if cfg.checksum not in {cfg.config_checksum(k) for k in range(len(MODEL_ABSENT_MEANS) + 1)}:
        raise UserFacingError(f"{file}: checksum mismatch: config.json was modified after training; refusing it")
    verify_signature(cfg, file, signing_key())
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
            raise UserFacingError(f"artifact {path}: checksum mismatch for {name} (corrupted or modified); refusing it")
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
