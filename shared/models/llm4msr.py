"""LLM4MSR hierarchical meta networks, wrapped around any backbone (hyper-parameters: llm4msr_config.py).

    k_s = a_s P_s e_s,  k_u = a_u P_u e_u             gated learned projections of frozen knowledge vectors
    m_s = act(W_s(k_s)^T x + b_s(k_s))                 scenario-level meta layer
    m_u = act(W_u(k_u, k_s)^T m_s + b_u(k_u, k_s))     user-level meta layer, conditioned on the scenario level
    bottom:   x~ = x + A m_u        parallel:  z = w^T m_u        y = sigmoid(backbone(x~, s) + z)

Generated weights are low rank, W(k) = U diag(1 + g(k)) V (as in APG/HAMUR): the hypernetwork emits r gains and a
bias instead of a D x h matrix, so a request computes g once for its (scenario, user) and every candidate pays only
x U (shared weights), an element-wise product and V. Item level (extension): k_i = P_i e_i joins x, and k_u * k_i
joins the meta layers' input so the user's knowledge is matched explicitly against the item's. Item-only
knowledge has no meta layers: k_i joins the backbone input and that is all.

Gates (config.gate, ReZero-style): a_l, a scalar or a [proj_dim] vector per level, starts at 0, so at
initialisation no knowledge reaches the score and a level opens only as far as it lowers the training loss
(knowledge helps where IDs are sparse and can hurt where they are dense); config.gate_decay pulls each gate back
towards 0, so a level that does not help stays nearly shut. The gate multiplies k_l wherever it goes
(hypernetworks, item concatenation, user*item interaction) and is folded into P_l: a_l (W e + b) = (a_l W) e + a_l b,
so serving pays nothing for it. gate="none" is the ungated model (no gate parameters). config.knowledge_dropout
drops units of each k_l per row in training.

Serving folds the frozen model for one request (`LLM4MSR.fold_for_requests` -> `RequestPath`): every map between
a raw knowledge vector and the hypernetworks' hidden layer is affine, so reduction, projection and the first
hypernetwork layer collapse into one matrix, and the generated low-rank layer U diag(g) V into one [in, out] matrix
per request. Same function, about half the operations per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserFacingError
from shared.models.llm4msr_config import LLM4MSRConfig

__all__ = ["LLM4MSR", "LLM4MSRConfig", "ItemFold", "LowRankMetaLayer", "RequestPath"]


# A level's learned projection with its gate folded in: (weight [p, r], bias [p]).
Projection = tuple[torch.Tensor, torch.Tensor]
# A gate is stored as a = alpha / GATE_STEP_SCALE. Adam moves every parameter by about lr per step, so alpha would
# move like one weight of the projection it scales and a useful level would open slowly (gated models lagged the
# ungated ones on the known-answer tasks); stored this way it moves GATE_STEP_SCALE times faster.
GATE_STEP_SCALE = 10.0


class _PullClosed(torch.autograd.Function):
    """Identity in forward; backward adds decay * a to the gate's gradient, an L2 prior that keeps a level closed
    unless the loss keeps opening it. Without it, Adam's normalised steps let the gate of a level that does not
    matter drift open about as far as a useful one's (config.gate_decay)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, stored: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(stored)
        ctx.decay = decay
        return stored.view_as(stored)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (stored,) = ctx.saved_tensors
        return grad + ctx.decay * stored, None


def _project(vec: torch.Tensor, projection: Projection | None) -> torch.Tensor:
    """k = projection(vec); vec itself when it is already projected (projection None)."""
    return F.linear(vec, *projection) if projection is not None else vec


class LowRankMetaLayer(nn.Module):
    """act(x U diag(1 + g(c)) V + b0 + b(c)), with g and b produced by a small MLP from the condition c."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, rank: int, hidden: int):
        super().__init__()
        self.u = nn.Linear(in_dim, rank, bias=False)
        self.v = nn.Linear(rank, out_dim)
        self.hyper = nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, rank + out_dim))
        self.rank = rank
        nn.init.normal_(self.hyper[-1].weight, std=0.01)
        nn.init.zeros_(self.hyper[-1].bias)

    def part(self, block: int, vec: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        """The share of condition block `block` in the hidden layer's pre-activation, from the block's knowledge
        before its projection: the projection and the block's columns of the first hypernetwork layer are composed
        (a [hidden, r] weight product) so a batch pays one [B, r] x [r, hidden] product instead of two. With
        projection None, vec is the projected knowledge itself (knowledge dropout needs it materialised)."""
        p = projection[0].shape[0] if projection is not None else vec.shape[1]
        w_block = self.hyper[0].weight[:, block * p : (block + 1) * p]
        if projection is None:
            return F.linear(vec, w_block)
        weight, bias = projection
        return F.linear(vec, w_block @ weight, w_block @ bias)

    def generate(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated layer from the summed block parts: gains 1 + g [G, r] and the full bias b0 + b(c)
        [G, out] (the 1 and b0 are folded into the output bias, a vector, not added per row)."""
        hidden = torch.relu(pre + self.hyper[0].bias)
        second = self.hyper[2]
        offset = torch.cat([torch.ones(self.rank, dtype=hidden.dtype, device=hidden.device), self.v.bias])
        gains, bias = torch.split(
            F.linear(hidden, second.weight, second.bias + offset), [self.rank, self.v.out_features], 1
        )
        return gains, bias

    def apply_generated(self, x: torch.Tensor, gains: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The generated layer on x. Not named `apply`: that would hide nn.Module.apply (model.apply(init_fn))."""
        return torch.relu(torch.addmm(bias, self.u(x) * gains, self.v.weight.T))


class LLM4MSR(nn.Module):
    """Turns knowledge vectors into a modified backbone input and a parallel logit."""

    def __init__(self, config: LLM4MSRConfig, x_dim: int, n_scenarios: int, n_users: int, n_items: int):
        super().__init__()
        self.config = config
        self.n_scenarios = n_scenarios
        c = config
        sizes = {"scenario": n_scenarios, "user": n_users, "item": n_items}
        if c.knowledge_source == "llm" and c.knowledge_dim <= 0:
            raise UserFacingError("the llm knowledge source needs knowledge_dim (the snapshot's vector size)")
        self.reduced_dim = min(c.reduce_dim, c.knowledge_dim) if c.knowledge_source == "llm" else c.proj_dim
        self.proj = nn.ModuleDict({lv: nn.Linear(self.reduced_dim, c.proj_dim) for lv in c.levels})
        self.gate: nn.ParameterDict | None = None
        if c.gate != "none":  # ReZero: every level starts closed (the module doc)
            size = 1 if c.gate == "scalar" else c.proj_dim
            self.gate = nn.ParameterDict({lv: nn.Parameter(torch.zeros(size)) for lv in c.levels})
        if c.knowledge_source == "llm":
            # Frozen per-level reduction (x - mean) @ basis, fitted on the snapshot by fit_reduction().
            for lv in c.levels:
                self.register_buffer(f"mean_{lv}", torch.zeros(c.knowledge_dim))
                self.register_buffer(f"basis_{lv}", torch.eye(c.knowledge_dim, self.reduced_dim))
        elif c.knowledge_source == "id":
            self.id_emb = nn.ModuleDict({lv: nn.Embedding(sizes[lv], c.proj_dim) for lv in c.levels})
            for emb in self.id_emb.values():
                nn.init.normal_(emb.weight, std=0.1)
        else:
            # Fixed random vectors per entity, saved with the model (buffers), so the control is reproducible.
            gen = torch.Generator().manual_seed(1234)
            for lv in c.levels:
                self.register_buffer(f"random_{lv}", torch.randn(sizes[lv], c.proj_dim, generator=gen))
        self.x_dim = x_dim + (c.proj_dim if c.uses_item else 0)  # backbone input: [x; k_i]
        meta_in = self.x_dim + (c.proj_dim if c.interaction else 0)
        self.meta = nn.ModuleList()
        for j, _lv in enumerate(c.meta_levels):
            self.meta.append(
                LowRankMetaLayer(
                    meta_in if j == 0 else c.meta_dim, c.meta_dim, c.proj_dim * (j + 1), c.rank, c.hyper_hidden
                )
            )
        self.bottom = None
        self.parallel = None
        if c.has_meta_layers and c.placement in ("bottom", "both"):
            self.bottom = nn.Linear(c.meta_dim, self.x_dim)
            nn.init.zeros_(self.bottom.weight)  # starts as the plain backbone; learns how much to modulate
        if c.has_meta_layers and c.placement in ("parallel", "both"):
            self.parallel = nn.Linear(c.meta_dim, 1)

    @property
    def needs_levels(self) -> frozenset[str]:
        return frozenset(self.config.levels) if self.config.knowledge_source == "llm" else frozenset()

    def projection(self, level: str) -> Projection:
        """P_l with the level's gate folded in: a (W e + b) = (a W) e + a b (a vector gate scales W's rows)."""
        proj = self.proj[level]
        if self.gate is None:
            return proj.weight, proj.bias
        stored = self.gate[level]
        if self.training and self.config.gate_decay > 0:
            stored = _PullClosed.apply(stored, self.config.gate_decay)
        alpha = stored * GATE_STEP_SCALE
        return alpha[:, None] * proj.weight, alpha * proj.bias

    @torch.no_grad()
    def gate_strength(self) -> dict[str, float]:
        """Mean |a_l| per level (empty without gates): how far training opened each level's knowledge."""
        if self.gate is None:
            return {}
        return {lv: float(stored.abs().mean()) * GATE_STEP_SCALE for lv, stored in self.gate.items()}

    @torch.no_grad()
    def fit_reduction(
        self, level: str, sample: torch.Tensor, space_reducer: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Standardize per dimension, then PCA to reduced_dim, scaled so components have unit variance on
        average (not whitened: noise directions are not amplified). sample = the snapshot's vectors.

        space_reducer = (mean [raw], components [d, raw]) of a reduced knowledge space's own PCA: the reduction is
        then fitted on the sample mapped back to the LLM's coordinates and folded into the space's, so that it
        reads a reduced space as it reads the LLM's vectors. (Standardizing the space's components directly would
        whiten them, decorrelated as they are, and leave the PCA no direction to prefer.)"""
        x = sample.double()
        if space_reducer is not None:
            space_mean, components = (t.double() for t in space_reducer)
            x = x @ components + space_mean
        mean = x.mean(0)
        scale = 1.0 / x.std(0).clamp_min(1e-6)
        z = (x - mean) * scale
        cov = z.T @ z / max(1, len(z) - 1)
        evals, evecs = torch.linalg.eigh(cov)
        top = torch.argsort(evals, descending=True)[: self.reduced_dim]
        basis = scale[:, None] * evecs[:, top] / evals[top].clamp_min(1e-12).mean().sqrt()
        if space_reducer is not None:
            # ((s C + m_space) - mean) @ basis == (s - mean_s) @ (C @ basis), since mean = mean_s C + m_space.
            basis = components @ basis
            mean = sample.double().mean(0)
        getattr(self, f"mean_{level}").copy_(mean.float())
        getattr(self, f"basis_{level}").copy_(basis.float())

    def reduce(self, level: str, raw: torch.Tensor) -> torch.Tensor:
        """Raw LLM vectors [n, d] -> [n, reduced_dim]; a NaN row (missing vector) becomes the level's mean."""
        centred = torch.nan_to_num(raw - getattr(self, f"mean_{level}"), nan=0.0)
        return centred @ getattr(self, f"basis_{level}")

    def _source(self, level: str, raw: torch.Tensor | None, index: torch.Tensor, reduced: bool) -> torch.Tensor:
        """A level's knowledge before the learned projection: reduced LLM vectors, ID or random embeddings."""
        src = self.config.knowledge_source
        if src == "id":
            return self.id_emb[level](index)
        if src == "random":
            return getattr(self, f"random_{level}")[index]
        if raw is None:
            raise UserFacingError(f"this model needs {level}-level knowledge vectors")
        return raw if reduced else self.reduce(level, raw)

    def forward(
        self,
        x: torch.Tensor,
        index: dict[str, torch.Tensor],
        raw: dict[str, torch.Tensor | None],
        reduced: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, D] -> (backbone input [B, D'], parallel logit [B] or None).

        raw[level] is [B, d] or [1, d] (one request: computed once and broadcast); index[level] is [B]. In
        training (reduced=True) the vectors come already reduced, and raw["scenario"] is the [S, r] table of all
        scenarios: the scenario level is then computed once per scenario and gathered. (Serving uses the folded
        RequestPath instead, see fold_for_requests.)
        """
        vec, proj, per_scenario = self._knowledge(index, raw, reduced)
        if self.config.uses_item:
            k_item = _project(vec["item"], proj["item"])
            x = torch.cat([x, k_item.expand(x.shape[0], -1)], dim=-1)
        h = x
        if self.config.interaction:
            h = torch.cat([h, _project(vec["user"], proj["user"]) * k_item], dim=-1)
        h = self._meta_layers(h, vec, proj, index["scenario"], per_scenario)
        # Separate products, not one [B, D+1] product split in two: its odd width and the split (a [B, D+1]
        # gradient concatenation in backward) cost more than the extra [B, m] x [m] product.
        x_out = self.bottom(h).add_(x) if self.bottom is not None else x
        z = self.parallel(h).squeeze(-1) if self.parallel is not None else None
        return x_out, z

    def _knowledge(
        self, index: dict[str, torch.Tensor], raw: dict[str, torch.Tensor | None], reduced: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, Projection | None], bool]:
        """Each level's knowledge before projection and its gated projection, and whether the scenario level is
        computed per scenario and gathered. With knowledge dropout (training) every level comes back projected
        and dropped out per row, its projection None."""
        c = self.config
        # The scenario level depends on the scenario only: its knowledge is an [S, .] table (id/random controls,
        # reduced training tables) unless this is one request, whose [1, d] scenario vector is broadcast anyway.
        table = "scenario" in c.levels and (
            c.knowledge_source != "llm" or (reduced and raw["scenario"].shape[0] == self.n_scenarios)
        )
        dropout = self.training and c.knowledge_dropout > 0
        vec: dict[str, torch.Tensor] = {}
        proj: dict[str, Projection | None] = {}
        for lv in c.levels:
            scenario_table = lv == "scenario" and table
            ids = torch.arange(self.n_scenarios, device=index[lv].device) if scenario_table else index[lv]
            vec[lv] = self._source(lv, raw.get(lv), ids, reduced)
            proj[lv] = self.projection(lv)
            if dropout:
                rows = vec[lv].index_select(0, index[lv]) if scenario_table else vec[lv]
                vec[lv] = F.dropout(_project(rows, proj[lv]), c.knowledge_dropout, training=True)
                proj[lv] = None
        return vec, proj, table and not dropout

    def _meta_layers(
        self,
        h: torch.Tensor,
        vec: dict[str, torch.Tensor],
        proj: dict[str, Projection | None],
        scenario: torch.Tensor,
        per_scenario: bool,
    ) -> torch.Tensor:
        """The chain of meta layers on h, each generated from its levels' knowledge (none for item-only)."""
        levels = self.config.meta_levels
        # Everything that depends on the scenario alone is computed on the S scenarios and gathered per row in one
        # index operation: the scenario-level layer's gains and bias, and the scenario block of later layers.
        if per_scenario:
            per_scenario_parts: list[torch.Tensor] = []
            for j, layer in enumerate(self.meta):
                part = layer.part(0, vec["scenario"], proj["scenario"])
                per_scenario_parts.extend(layer.generate(part) if j == 0 else [part])
            widths = [t.shape[1] for t in per_scenario_parts]
            table = torch.cat(per_scenario_parts, 1)
            gathered = iter(torch.split(table.index_select(0, scenario), widths, 1))
        for j, layer in enumerate(self.meta):
            if per_scenario and j == 0:
                gains, bias = next(gathered), next(gathered)
            else:
                pre = next(gathered) if per_scenario else None
                for block, lv in enumerate(levels[: j + 1]):
                    if not (per_scenario and lv == "scenario"):
                        part = layer.part(block, vec[lv], proj[lv])
                        pre = part if pre is None else pre + part
                gains, bias = layer.generate(pre)
            h = layer.apply_generated(h, gains, bias)
        return h

    @torch.no_grad()
    def fold_for_requests(self) -> RequestPath | None:
        """The frozen wrapper folded for one-request scoring; None for the id/random controls (they index tables
        by entity and gain nothing from folding). Recompute after any weight change."""
        c = self.config
        if c.knowledge_source != "llm":
            return None
        levels = c.meta_levels
        affine = self._fold_affine()
        cond_w, cond_b = self._fold_conditions(affine)
        gen_w, gen_b = self._fold_generators()
        item = None
        if c.uses_item:
            a, a_bias = affine["item"]
            item = ItemFold(
                mean=self.mean_item.clone(),
                raw_w=a.float(),
                reduced_w=self.projection("item")[0].T.float().contiguous(),
                bias=a_bias.float(),
            )
        means = [getattr(self, f"mean_{lv}") for lv in levels]
        return RequestPath(
            levels=tuple(levels),
            means=torch.cat(means).view(1, -1) if means else torch.zeros(1, 0),
            cond_w=cond_w.float(),
            cond_b=cond_b.float().view(1, -1),
            n_hidden=c.hyper_hidden * len(levels),
            gen_w=gen_w.float(),
            gen_b=gen_b.float().view(1, -1),
            layers=tuple(
                (layer.u.weight.T.contiguous(), layer.v.weight.T.contiguous(), layer.rank) for layer in self.meta
            ),
            bottom=self.bottom.weight.T.contiguous() if self.bottom is not None else None,
            bottom_b=self.bottom.bias.clone() if self.bottom is not None else None,
            parallel=self.parallel.weight[0].clone() if self.parallel is not None else None,
            parallel_b=self.parallel.bias.clone() if self.parallel is not None else None,
            item=item,
            proj_dim=c.proj_dim,
        )

    def _fold_affine(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per level, k_l = nan_to_num(e_l - mean_l) @ A_l + a_l in float64: reduction, projection and gate."""
        affine = {}
        for lv in self.config.levels:
            weight, bias = (t.to(torch.float64) for t in self.projection(lv))  # [p, r], [p]
            basis = getattr(self, f"basis_{lv}").to(torch.float64)  # [d, r]
            affine[lv] = (basis @ weight.T, bias)
        return affine

    def _fold_conditions(self, affine: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """(cond_w [L*d, H (+ p)], cond_b): every meta layer's hyper hidden units from the raw meta-level vectors,
        then k_u itself when the item interaction needs it."""
        c, f64 = self.config, torch.float64
        d, p, hidden, levels = c.knowledge_dim, c.proj_dim, c.hyper_hidden, c.meta_levels
        n_cols = hidden * len(levels) + (p if c.interaction else 0)
        cond_w = torch.zeros(d * len(levels), n_cols, dtype=f64)
        cond_b = torch.zeros(n_cols, dtype=f64)
        for j, layer in enumerate(self.meta):
            first = layer.hyper[0]
            cols = slice(j * hidden, (j + 1) * hidden)
            cond_b[cols] = first.bias.to(f64)
            for block, lv in enumerate(levels[: j + 1]):
                a, a_bias = affine[lv]
                w_block = first.weight.to(f64)[:, block * p : (block + 1) * p]  # [hidden, p]
                cond_w[block * d : (block + 1) * d, cols] = a @ w_block.T
                cond_b[cols] += a_bias @ w_block.T
        if c.interaction:
            block = levels.index("user")
            a, a_bias = affine["user"]
            cond_w[block * d : (block + 1) * d, hidden * len(levels) :] = a
            cond_b[hidden * len(levels) :] = a_bias
        return cond_w, cond_b

    def _fold_generators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gen_w, gen_b): the second hypernetwork layers side by side (block-diagonal), with the gains' 1 and v's
        bias folded in."""
        f64, hidden = torch.float64, self.config.hyper_hidden
        widths = [layer.rank + layer.v.out_features for layer in self.meta]
        gen_w = torch.zeros(hidden * len(self.meta), sum(widths), dtype=f64)
        gen_b = torch.zeros(sum(widths), dtype=f64)
        start = 0
        for j, layer in enumerate(self.meta):
            second = layer.hyper[2]
            gen_w[j * hidden : (j + 1) * hidden, start : start + widths[j]] = second.weight.to(f64).T
            gen_b[start : start + widths[j]] = second.bias.to(f64)
            gen_b[start : start + layer.rank] += 1.0
            gen_b[start + layer.rank : start + widths[j]] += layer.v.bias.to(f64)
            start += widths[j]
        return gen_w, gen_b


@dataclass(frozen=True)
class ItemFold:
    """k_i from raw item vectors (nan_to_num(e - mean) @ raw_w + bias) or reduced ones (reduced @ reduced_w + bias)."""

    mean: torch.Tensor
    raw_w: torch.Tensor
    reduced_w: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class RequestPath:
    """LLM4MSR folded for one request: knowledge of one scenario and one user, N candidates.

    Per request: one [1, L*d] x [L*d, H] product gives every hypernetwork's hidden layer (and k_u), one more gives
    all generated gains and biases, and each meta layer becomes a single [in, out] matrix. Per candidate: one
    matrix product + ReLU per meta layer, then the bottom output (added to x) and the parallel logit.
    """

    levels: tuple[str, ...]
    means: torch.Tensor  # [1, L*d]
    cond_w: torch.Tensor  # [L*d, H (+ p)]
    cond_b: torch.Tensor
    n_hidden: int
    gen_w: torch.Tensor  # [H, sum(r_j + out_j)]
    gen_b: torch.Tensor
    layers: tuple[tuple[torch.Tensor, torch.Tensor, int], ...]  # (U^T [in, r], V^T [r, out], r)
    bottom: torch.Tensor | None  # [meta_dim, x_dim]
    bottom_b: torch.Tensor | None
    parallel: torch.Tensor | None  # [meta_dim]
    parallel_b: torch.Tensor | None
    item: ItemFold | None
    proj_dim: int

    def _generated_layers(
        self, raw: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """(the condition row [1, H (+ p)], each meta layer's [in, out] weight and [1, out] bias) for this request's
        meta-level vectors; (None, [], []) for item-only knowledge (no meta layers)."""
        if not self.levels:
            return None, [], []
        e = torch.cat([raw[lv] for lv in self.levels], dim=1) if len(self.levels) > 1 else raw[self.levels[0]]
        cond = torch.addmm(self.cond_b, torch.nan_to_num(e - self.means, nan=0.0), self.cond_w)
        gen = torch.addmm(self.gen_b, torch.relu(cond[:, : self.n_hidden]), self.gen_w)
        weights, biases, start = [], [], 0
        for u_t, v_t, rank in self.layers:
            out = v_t.shape[1]
            gains = gen[0, start : start + rank]
            weights.append(u_t @ (gains[:, None] * v_t))
            biases.append(gen[:, start + rank : start + rank + out])
            start += rank + out
        return cond, weights, biases

    def __call__(
        self,
        x: torch.Tensor,
        raw: dict[str, torch.Tensor | None],
        item_reduced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D] field embeddings, raw[level] [1, d] for the meta levels (and [N, d] for items unless
        item_reduced [N, r] is given) -> (backbone input [N, D'], parallel logit [N] or None)."""
        cond, weights, biases = self._generated_layers(raw)
        h = x
        if self.item is not None:
            fold = self.item
            if item_reduced is not None:
                k_i = torch.addmm(fold.bias, torch.nan_to_num(item_reduced, nan=0.0), fold.reduced_w)
            else:
                k_i = torch.addmm(fold.bias, torch.nan_to_num(raw["item"] - fold.mean, nan=0.0), fold.raw_w)
            x = torch.cat([x, k_i], dim=1)
            if cond is not None and (k_u_cols := cond.shape[1] - self.n_hidden):
                # [x, k_i, k_u * k_i] @ W0 == [x, k_i] @ [W0_x; W0_i + k_u^T * W0_ui]
                w0 = weights[0]
                k_u = cond[0, self.n_hidden :]
                dx = x.shape[1] - self.proj_dim
                w_ui = w0[dx : dx + k_u_cols] + k_u[:, None] * w0[dx + k_u_cols :]
                weights[0] = torch.cat([w0[:dx], w_ui], dim=0)
            h = x
        for w, b in zip(weights, biases):
            h = torch.relu_(torch.addmm(b, h, w))
        # As in the module: separate products, the bottom one accumulated onto x.
        x_out = torch.addmm(self.bottom_b, h, self.bottom).add_(x) if self.bottom is not None else x
        z = torch.addmv(self.parallel_b, h, self.parallel) if self.parallel is not None else None
        return x_out, z
