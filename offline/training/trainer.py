"""Training loop: Adam, early stopping on validation AUC (logloss if AUC is undefined), seeded, capped threads,
progress with samples/s.

Data comes from the Split (train/valid/test rows); knowledge from a KnowledgeSnapshot built on the SAME split
(its manifest's split_fingerprint must equal the split's, otherwise the user prompts may have seen held-out rows).
Under the leak-free protocol (the default) the user level reads the snapshot's fit vectors on the train rows after
each user's fit cutoff (offline/training/leakage.py). `--levels auto` trains several level sets and keeps the best
on validation (offline/training/auto_levels.py).

Reproducible at any thread count: the same data, knowledge, config, seed and thread count give a byte-identical
model.safetensors on the same machine and torch version (another thread count changes the last bits: float sums
are split per thread). Data order comes from seeded generators only, and every op whose backward accumulates into
shared rows has a deterministic CPU kernel: the models gather with embedding / index_select / gather (their
backwards add serially or per output row), never with advanced indexing (param[index]), whose backward
(accumulating index_put_) adds with atomic floats across threads in an order that changes from run to run.
`deterministic_ops` turns on torch's deterministic mode while training as a guard for code added later (it makes
that index_put_ serial). The artifact records torch's version and the thread count.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from offline.data.split import Split
from offline.training.auto_levels import LevelSelection, train_auto
from offline.training.calibration import Calibration, fit_platt
from offline.training.config import TrainConfig
from offline.training.leakage import UserProtocol, check_knowledge_inputs, protocol_train_rows
from offline.training.metrics import summarize
from shared.dataset.folder import Dataset
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.models.backbones.base import RecountableStatistics
from shared.models.ctr import CTRModel, ModelConfig
from shared.models.features import FeatureEncoder

log = logging.getLogger(__name__)


@dataclass
class Arrays:
    """One split, encoded: everything a batch needs, as tensors."""

    frame: pd.DataFrame
    fields: torch.Tensor
    scenario: torch.Tensor
    user_row: torch.Tensor
    item_row: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, name: str, idx: torch.Tensor | slice) -> torch.Tensor:
        """Rows idx of one column: a view for a slice, index_select for indices (about 5x faster than advanced
        indexing on CPU, which matters at one gather per column per step)."""
        column = getattr(self, name)
        return column[idx] if isinstance(idx, slice) else column.index_select(0, idx)


class KnowledgeTables:
    """Snapshot vectors as tensors aligned for gathering: scenarios by scenario index, users with the default
    user vector after the serve vectors (then, under the leak-free protocol, the fit vectors), items with a NaN
    row (= average) last."""

    def __init__(self, snapshot: KnowledgeSnapshot, scenarios: list[str], levels: list[str], fit_users: bool = False):
        self.snapshot = snapshot
        self.dim = snapshot.space.dim
        self.tables: dict[str, torch.Tensor] = {}
        self.reduced = False
        self._users = snapshot.users() if ("user" in levels or "scenario" in levels) else None
        self._fit_users = snapshot.fit_users() if (fit_users and "user" in levels) else None
        if "scenario" in levels:
            vec, found = snapshot.scenarios().lookup(scenarios)
            if not found.all():
                missing = [s for s, f in zip(scenarios, found) if not f]
                raise UserFacingError(f"knowledge snapshot {snapshot.path} has no vector for scenario(s) {missing}")
            self.tables["scenario"] = torch.from_numpy(vec)
        if "user" in levels:
            users = self._users
            stacked = [users.embeddings, snapshot.default_user()[None]]
            if self._fit_users is not None:
                if self._fit_users.dim != users.dim:
                    raise UserFacingError(
                        f"knowledge snapshot {snapshot.path}: fit user vectors have {self._fit_users.dim} dimensions, "
                        f"serve user vectors {users.dim}; rebuild the snapshot"
                    )
                stacked.append(self._fit_users.embeddings)
            self.tables["user"] = torch.from_numpy(np.vstack(stacked))
        if "item" in levels:
            items = snapshot.items()
            nan = np.full((1, items.dim), np.nan, dtype=np.float32)
            self.tables["item"] = torch.from_numpy(np.vstack([items.embeddings, nan]))
        # Reduction samples: scenario and user prompts share one distribution (fitted on the user table, the
        # larger sample); item vectors (encoded titles) get their own.
        self.samples = {
            lv: torch.tensor(snapshot.items().embeddings if lv == "item" else self._users.embeddings) for lv in levels
        }

    def fit_and_reduce(self, model: CTRModel) -> None:
        """Fits the model's frozen reduction on the snapshot (through the space's own PCA when it has one), then
        replaces the tables by their reduced form, so that training gathers small vectors (the same function the
        serving path applies per request)."""
        reducer = self.snapshot.reducer()
        space_reducer = tuple(torch.from_numpy(t) for t in reducer) if reducer is not None else None
        for level, sample in self.samples.items():
            model.wrapper.fit_reduction(level, sample, space_reducer)
        with torch.no_grad():
            self.tables = {lv: model.wrapper.reduce(lv, t).contiguous() for lv, t in self.tables.items()}
        self.reduced = True

    def leak_free_user_rows(self, ids: pd.Series, early: np.ndarray) -> np.ndarray:
        """User-table rows of train rows under leak-free: the user's fit vector on LATE rows (the cold-start
        vector for a user without one), the cold-start vector on EARLY rows (nothing known of the user yet)."""
        default_row = len(self._users.ids)
        pos = self._fit_users.positions(ids.astype(str).tolist())
        late = np.where(pos < 0, default_row, pos + default_row + 1)
        return np.where(early, default_row, late).astype(np.int64)

    def rows(self, level: str, ids: pd.Series) -> np.ndarray:
        if level not in self.tables:
            return np.zeros(len(ids), dtype=np.int64)
        table = self.snapshot.users() if level == "user" else self.snapshot.items()
        pos = table.positions(ids.astype(str).tolist())
        pos[pos < 0] = len(table.ids)  # default user / NaN item row
        return pos.astype(np.int64)


def encode_split(frame: pd.DataFrame, encoder: FeatureEncoder, tables: KnowledgeTables | None) -> Arrays:
    fields, scen = encoder.encode_frame(frame)
    user_row = tables.rows("user", frame["user_id"]) if tables else np.zeros(len(frame), np.int64)
    item_row = tables.rows("item", frame["item_id"]) if tables else np.zeros(len(frame), np.int64)
    return Arrays(
        frame=frame,
        fields=torch.from_numpy(fields),
        scenario=torch.from_numpy(scen),
        user_row=torch.from_numpy(user_row),
        item_row=torch.from_numpy(item_row),
        label=torch.tensor(frame["label"].to_numpy(np.float32)),
    )


def batch_knowledge(tables: KnowledgeTables | None, data: Arrays, idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    if tables is None:
        return {}
    out = {}
    if "scenario" in tables.tables:
        # Reduced tables: the wrapper takes all S scenario vectors and gathers per row itself.
        table = tables.tables["scenario"]
        out["scenario"] = table if tables.reduced else table.index_select(0, data.rows("scenario", idx))
    if "user" in tables.tables:
        out["user"] = tables.tables["user"].index_select(0, data.rows("user_row", idx))
    if "item" in tables.tables:
        out["item"] = tables.tables["item"].index_select(0, data.rows("item_row", idx))
    return out


def _reduced(tables: KnowledgeTables | None) -> bool:
    return tables is not None and tables.reduced


def make_optimizer(model: CTRModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the fused kernel: one update over all parameters instead of ~8 small ops per tensor (the wrapper
    adds ~20 small tensors, so the per-tensor loop was a visible share of its step time on CPU). The wrapper's
    parameters form a second group when cfg.knowledge_lr_scale sets their learning rate apart."""
    if model.wrapper is None or cfg.knowledge_lr_scale == 1.0:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    knowledge = {id(p) for p in model.wrapper.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in knowledge]},
        {"params": list(model.wrapper.parameters()), "lr": cfg.lr * cfg.knowledge_lr_scale},
    ]
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@contextlib.contextmanager
def deterministic_ops(enabled: bool = True) -> Iterator[None]:
    """torch's deterministic mode for the duration of the block, then the previous settings (the process may be a
    test or a notebook). Filling uninitialized memory, a debugging aid of the same switch, stays off: training
    never reads uninitialized memory, and the fill would cost a write per allocation."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def forward_rows(
    model: CTRModel, tables: KnowledgeTables | None, data: Arrays, idx: torch.Tensor | slice
) -> torch.Tensor:
    """The model's logits for rows idx of data, with their knowledge."""
    return model(
        data.rows("fields", idx), data.rows("scenario", idx), batch_knowledge(tables, data, idx), _reduced(tables)
    )


def train_step(
    model: CTRModel,
    optim: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    tables: KnowledgeTables | None,
    data: Arrays,
    idx: torch.Tensor,
) -> torch.Tensor:
    """One optimizer step on rows idx of data; returns the (detached) mean loss."""
    loss = loss_fn(forward_rows(model, tables, data, idx), data.rows("label", idx))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.detach()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.inference_mode()
def predict(
    model: CTRModel, tables: KnowledgeTables | None, data: Arrays, batch_size: int, logits: bool = False
) -> np.ndarray:
    """Probabilities (or, with logits=True, the logits) of every row of data."""
    model.eval()
    out = np.zeros(len(data), dtype=np.float32)
    for start in range(0, len(data), batch_size):
        idx = slice(start, min(start + batch_size, len(data)))
        raw = forward_rows(model, tables, data, idx)
        out[idx] = (raw if logits else torch.sigmoid(raw)).numpy()
    return out


def runtime_info() -> dict:
    """What a bit-identical retrain or evaluation needs beyond the config: torch's version and the intra-op thread
    count actually used (float reductions are split by thread, so results depend on both)."""
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


@dataclass
class TrainResult:
    model: CTRModel
    encoder: FeatureEncoder
    metrics: dict
    history: list[dict]
    config: TrainConfig
    knowledge: KnowledgeSnapshot | None
    seconds: float
    best_epoch: float  # fractional when validation runs more than once per epoch
    early_stopping: str = "auc"  # the validation metric early stopping followed
    runtime: dict = field(default_factory=dict)  # runtime_info() at training time
    user_protocol: UserProtocol | None = None  # how the user level met the train rows
    level_selection: LevelSelection | None = None  # --levels auto: the choice and every candidate's numbers
    calibration: Calibration | None = None  # the Platt scaling fitted on validation (None: raw scores)

    def artifact_fields(self, split: Split) -> dict:
        """The ArtifactConfig fields that training knows."""
        wrapper = self.model.config.llm4msr
        kn = self.knowledge if (wrapper is not None and wrapper.knowledge_source == "llm") else None
        return {
            "llm4msr": wrapper is not None,
            "knowledge_source": wrapper.knowledge_source if wrapper else "none",
            "levels": list(wrapper.levels) if wrapper else [],
            "placement": wrapper.placement if wrapper else None,
            "knowledge_space_id": kn.space.id if kn else None,
            "knowledge_version": kn.version if kn else None,
            "knowledge_dim": kn.space.dim if kn else None,
            "train": {
                **self.config.to_dict(),
                "best_epoch": self.best_epoch,
                "early_stopping": self.early_stopping,
                **self.runtime,
                "seconds": round(self.seconds, 1),
                "history": self.history,
                **({"user_protocol": self.user_protocol.to_dict()} if self.user_protocol else {}),
                **({"level_selection": self.level_selection.to_dict()} if self.level_selection else {}),
                **({"calibration": self.calibration.to_dict()} if self.calibration else {}),
            },
            "metrics": self.metrics,
            "data_fingerprint": split.dataset_fingerprint,
            "split_fingerprint": split.fingerprint(),
            "split_config": split.config.to_dict(),
        }


def build_model(cfg: TrainConfig, encoder: FeatureEncoder, knowledge_dim: int) -> CTRModel:
    """The network of cfg over the encoder's fields; knowledge_dim = the snapshot's vector size (0 without one)."""
    wrapper = cfg.wrapper.model_copy(update={"knowledge_dim": knowledge_dim}) if cfg.llm4msr else None
    return CTRModel(
        ModelConfig(
            fields=list(encoder.field_sizes().items()),
            n_scenarios=len(encoder.scenarios),
            embed_dim=cfg.embed_dim,
            embed_init_std=cfg.embed_init_std,
            backbone=cfg.backbone,
            backbone_params=cfg.backbone_params,
            llm4msr=wrapper,
        )
    )


METRIC_NAMES = {"auc": "AUC", "logloss": "logloss"}


def early_stopping_metric(valid: Arrays) -> str:
    """The validation metric early stopping follows: AUC, or logloss when the validation rows have one class only
    (AUC is undefined there, NaN in every epoch, while logloss still tells a better model from a worse one)."""
    labels = valid.label
    if len(labels) and bool((labels == labels[0]).all()):
        log.warning(
            "the validation split has one class only (%d rows, all label %g): AUC is undefined, so early stopping "
            "uses validation logloss",
            len(labels),
            float(labels[0]),
        )
        return "logloss"
    return "auc"


def train(dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot | None, cfg: TrainConfig) -> TrainResult:
    """Trains with early stopping and returns the best epoch's model and its valid/test metrics.

    Early stopping follows validation AUC, or validation logloss when the validation split has one class only
    (logged; see early_stopping_metric). An epoch whose metric is NaN (non-finite scores) never counts as the best;
    if no epoch has a usable metric, training fails with a UserFacingError instead of keeping an arbitrary model.
    Byte-identical for the same inputs, seed and thread count (see the module doc). With cfg.levels_auto (and
    LLM4MSR on), trains each candidate level set and returns the best on validation (auto_levels.train_auto).
    """
    if cfg.levels_auto and cfg.llm4msr:
        return train_auto(dataset, split, snapshot, cfg, _train_seeded)
    return _train_seeded(dataset, split, snapshot, cfg)


def _train_seeded(dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot | None, cfg: TrainConfig) -> TrainResult:
    """One fixed-levels run, seeded and in deterministic mode."""
    torch.set_num_threads(max(1, cfg.threads))
    seed_everything(cfg.seed)
    with deterministic_ops():
        return _train(dataset, split, snapshot, cfg)


@dataclass
class Prepared:
    """What the epochs need: the encoder, the fresh model, its knowledge tables and every split encoded."""

    encoder: FeatureEncoder
    model: CTRModel
    tables: KnowledgeTables | None
    data: dict[str, Arrays]
    protocol: UserProtocol


def prepare(dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot | None, cfg: TrainConfig) -> Prepared:
    """Checks the inputs, fits the encoder, builds the model (seeded by the caller) and encodes the splits (the
    train rows as the user protocol has them: offline/training/leakage.py)."""
    protocol = check_knowledge_inputs(cfg, split, snapshot)
    uses_llm = cfg.llm4msr and cfg.wrapper.knowledge_source == "llm"
    encoder = FeatureEncoder.fit(dataset, split.train)
    levels = cfg.wrapper.levels
    tables = KnowledgeTables(snapshot, encoder.scenarios, levels, fit_users=protocol.applied) if uses_llm else None
    model = build_model(cfg, encoder, tables.dim if tables else 0)
    if tables is not None:
        tables.fit_and_reduce(model)
    train_rows = protocol_train_rows(split, protocol)
    frames = {**split.frames(), "train": train_rows.frame}
    data = {name: encode_split(frame, encoder, tables) for name, frame in frames.items()}
    if train_rows.early is not None:
        user_rows = tables.leak_free_user_rows(train_rows.frame["user_id"], train_rows.early)
        data["train"].user_row = torch.from_numpy(user_rows)
    if len(data["train"]) == 0 or len(data["valid"]) == 0:
        raise UserFacingError("training needs non-empty train and validation splits")
    return Prepared(encoder, model, tables, data, train_rows.protocol)


@dataclass
class EarlyStopping:
    """Follows one validation metric (higher AUC, or lower logloss) and keeps the best epoch's weights."""

    metric: str
    patience: int  # in validation checks
    best_score: float = -math.inf  # the metric with its sign: higher is better
    best_epoch: float = 0
    best_state: dict | None = None
    bad_checks: int = 0

    def update(self, epoch: float, valid: dict, model: CTRModel) -> bool:
        """Records a validation check's metrics; True when training should stop. A NaN is never the best."""
        score = valid[self.metric] if self.metric == "auc" else -valid[self.metric]
        if not math.isnan(score) and score > self.best_score + 1e-5:
            self.best_score, self.best_epoch, self.bad_checks = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.bad_checks += 1
        return self.bad_checks > self.patience

    @property
    def best_value(self) -> float:
        """The best epoch's metric as measured (without the sign)."""
        return self.best_score if self.metric == "auc" else -self.best_score


def train_rows(
    prepared: Prepared, optim: torch.optim.Optimizer, rows: torch.Tensor, cfg: TrainConfig, desc: str
) -> float:
    """One pass over the train rows in the order rows; returns the mean training loss."""
    model, train_data = prepared.model, prepared.data["train"]
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n, total = len(rows), 0.0
    bar = tqdm(total=n, desc=desc, unit="row", unit_scale=True, disable=not cfg.progress, mininterval=1.0, leave=False)
    for start in range(0, n, cfg.batch_size):
        idx = rows[start : start + cfg.batch_size]
        total += float(train_step(model, optim, loss_fn, prepared.tables, train_data, idx)) * len(idx)
        bar.update(len(idx))
    bar.close()
    return total / n


def check_points(epoch: int, perm: torch.Tensor, checks: int, batch_size: int) -> list[tuple[float, torch.Tensor]]:
    """An epoch's row order cut into `checks` parts at batch boundaries, each with the (fractional) epoch at its
    end: validation runs after each. The batches are those of one check per epoch, so checking more often changes
    what is measured, not what is trained; whole epochs stay ints, so one check records what it always did."""
    batches = -(-len(perm) // batch_size)
    cuts = [min(len(perm), round(batches * j / checks) * batch_size) for j in range(checks + 1)]
    return [
        (epoch if j == checks else round(epoch - 1 + j / checks, 3), perm[cuts[j - 1] : cuts[j]])
        for j in range(1, checks + 1)
        if cuts[j] > cuts[j - 1]
    ]


@torch.no_grad()
def recount_statistics(prepared: Prepared, rows: torch.Tensor, batch_size: int) -> None:
    """Sets the eval-mode statistics of the model's RecountableStatistics layers (STAR's partitioned norm) to the
    average over train-mode forwards of `rows` in training-sized batches, the weights held. No-op without such
    layers; the optimizer never sees these forwards."""
    model, train_data = prepared.model, prepared.data["train"]
    layers = [m for m in model.modules() if isinstance(m, RecountableStatistics)]
    if not layers or not len(rows):
        return
    model.train()
    for layer in layers:
        layer.recount_start()
    try:
        with torch.random.fork_rng(devices=[]):  # train-mode dropout must not shift the training's random stream
            for start in range(0, len(rows), batch_size):
                forward_rows(model, prepared.tables, train_data, rows[start : start + batch_size])
    finally:
        for layer in layers:
            layer.recount_stop()


def fit(prepared: Prepared, cfg: TrainConfig, stopping: EarlyStopping) -> list[dict]:
    """The epochs, until early stopping; leaves the best check's weights in the model. Returns the history."""
    model, valid_data = prepared.model, prepared.data["valid"]
    optim = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(prepared.data["train"])
    history: list[dict] = []
    # the same sampled rows at every check, from a generator of their own: the training order is not touched
    recount = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[
        : cfg.norm_stats_batches * cfg.batch_size
    ]
    # every validation check of every epoch in order; each epoch's row order is drawn when the epoch begins
    checks = (
        check
        for epoch in range(1, cfg.epochs + 1)
        for check in check_points(epoch, torch.randperm(n, generator=gen), cfg.checks_per_epoch, cfg.batch_size)
    )
    for at, rows in checks:
        t0 = time.perf_counter()
        train_loss = train_rows(prepared, optim, rows, cfg, f"{cfg.backbone} epoch {at}")
        train_seconds = time.perf_counter() - t0
        recount_statistics(prepared, recount, cfg.batch_size)
        # early stopping needs AUC/logloss only
        valid = summarize(valid_data.frame, predict(model, prepared.tables, valid_data, cfg.eval_batch_size), top_k=())
        row = {
            "epoch": at,
            "train_loss": train_loss,
            "valid_auc": valid["overall"]["auc"],
            "valid_logloss": valid["overall"]["logloss"],
            "train_seconds": round(train_seconds, 2),
            "samples_per_s": round(len(rows) / train_seconds, 1),
        }
        history.append(row)
        log.info(
            "epoch %s: loss %.4f valid AUC %.4f logloss %.4f (%.1fs, %.0f samples/s)",
            at,
            train_loss,
            row["valid_auc"],
            row["valid_logloss"],
            train_seconds,
            row["samples_per_s"],
        )
        if stopping.update(at, valid["overall"], model):
            if stopping.best_state is not None:
                log.info(
                    "early stopping after epoch %s (best epoch %s, valid %s %.4f)",
                    at,
                    stopping.best_epoch,
                    METRIC_NAMES[stopping.metric],
                    stopping.best_value,
                )
            break
    if stopping.best_state is None:
        raise UserFacingError(
            f"validation {METRIC_NAMES[stopping.metric]} was NaN at all {len(history)} validation check(s): the model's "
            "scores are not finite (training diverged); try a lower --lr"
        )
    model.load_state_dict(stopping.best_state)
    model.eval()
    return history


def _train(dataset: Dataset, split: Split, snapshot: KnowledgeSnapshot | None, cfg: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    prepared = prepare(dataset, split, snapshot, cfg)
    stopping = EarlyStopping(early_stopping_metric(prepared.data["valid"]), cfg.patience * cfg.checks_per_epoch)
    history = fit(prepared, cfg, stopping)
    data = prepared.data
    calibration = calibrate(prepared, cfg) if cfg.calibrate else None
    metrics = {
        name: summarize(data[name].frame, predict(prepared.model, prepared.tables, data[name], cfg.eval_batch_size))
        for name in ("valid", "test")
        if len(data[name])
    }
    return TrainResult(
        model=prepared.model,
        encoder=prepared.encoder,
        metrics=metrics,
        history=history,
        config=cfg,
        knowledge=snapshot,
        seconds=time.perf_counter() - started,
        best_epoch=stopping.best_epoch,
        early_stopping=stopping.metric,
        runtime=runtime_info(),
        user_protocol=prepared.protocol,
        calibration=calibration,
    )


def calibrate(prepared: Prepared, cfg: TrainConfig) -> Calibration | None:
    """Fits Platt scaling on the validation rows and sets it in the model (logged either way)."""
    valid = prepared.data["valid"]
    logits = predict(prepared.model, prepared.tables, valid, cfg.eval_batch_size, logits=True)
    fitted = fit_platt(logits, valid.label.numpy())
    if fitted is None:
        log.info(
            "calibration: none (on these validation rows it is undefined, or it would tie float32 scores that differ)"
        )
        return None
    prepared.model.set_calibration(fitted.scale, fitted.bias)
    log.info(
        "calibration on validation: scale %.3f bias %+.3f (valid logloss %.4f -> %.4f)",
        fitted.scale,
        fitted.bias,
        fitted.valid_logloss_before,
        fitted.valid_logloss_after,
    )
    return fitted
