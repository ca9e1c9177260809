"""PEPNet (Chang et al., KDD 2023): gate neural units that personalise the embeddings (EPNet) and every layer of the
tower (PPNet).

    GNU(c)   = gamma * sigmoid(W2 relu(W1 c + b1) + b2)           gamma = 2: a gate of 1 leaves the input unchanged
    EPNet    O_ep = GNU_ep([e_s, sg(x)]) * x                      e_s: the scenario's embedding, sg: stop-gradient
    PPNet    h_0 = O_ep,  h_{l+1} = act(W_l (GNU_l([e_s, sg(O_ep)]) * h_l) + b_l),   logit = h_L

Field layout. The backbone sees x [B, D], the field embeddings concatenated by shared/models/ctr.py in the
encoder's field order (user_id, item_id, scenario, then category and the extra features; with the LLM4MSR wrapper
the item knowledge k_i is appended and the bottom placement adds A m_u to every column). The paper's personal
priors are the user/item id embeddings; here PPNet's condition is the whole stop-gradient EPNet output, which holds
the user_id and item_id embeddings (and, with the wrapper, the knowledge), plus the scenario. The backbone does not
slice out the user/item columns: it does not know the embedding width, and with the wrapper's bottom placement the
knowledge reaches the tower only through these columns. The stop-gradient keeps the gates from pulling the shared
embeddings towards what the gates need (the paper's reason), so the embeddings are trained by the tower alone.

The scenario's share of every gate's first layer (W1 e_s) depends on the scenario alone: it is one embedding of the
first layer's width per gate, read per row (the same family of functions as a scenario embedding followed by its
block of W1, with one product less). The PPNet gates share their condition, so their first layers run as one matrix
product. Every operation is row-wise.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.backbones.base import Backbone, BackboneConfig


class PEPNetConfig(BackboneConfig):
    hidden: list[int] = [128, 64]
    gate_hidden: int = 64
    gate_scale: float = 2.0


class GateHidden(nn.Module):
    """The first layer of one or more gate units over the same condition: relu(W1 sg(c) + scenario's share)."""

    def __init__(self, cond_dim: int, width: int, n_scenarios: int):
        super().__init__()
        self.cond = nn.Linear(cond_dim, width)
        self.scenario = nn.Embedding(n_scenarios, width)  # N(0, 1): gates differ by scenario from the start

    def forward(self, cond: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.cond(cond.detach()) + self.scenario(scenario))


def gate_output(hidden_dim: int, out_dim: int) -> nn.Linear:
    """The second layer of a gate unit, initialised near zero so every gate starts at gamma * sigmoid(0) = 1 (the
    plain tower) and learns how far to move from it."""
    layer = nn.Linear(hidden_dim, out_dim)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class PEPNet(Backbone):
    config_class = PEPNetConfig

    def __init__(self, config: PEPNetConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        gh = config.gate_hidden
        dims = [input_dim, *config.hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.ep_hidden = GateHidden(input_dim, gh, n_scenarios)
        self.ep_out = gate_output(gh, input_dim)
        # One gate per tower layer, on that layer's input (widths dims[:-1]).
        self.pp_hidden = GateHidden(input_dim, gh * len(self.layers), n_scenarios)
        self.pp_out = nn.ModuleList(gate_output(gh, width) for width in dims[:-1])
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _gate(self, out: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        return self.config.gate_scale * torch.sigmoid(out(hidden))

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        h = x * self._gate(self.ep_out, self.ep_hidden(x, scenario))  # EPNet
        pp_hidden = self.pp_hidden(h, scenario).chunk(len(self.layers), dim=1)
        for i, (layer, out) in enumerate(zip(self.layers, self.pp_out)):
            h = layer(h * self._gate(out, pp_hidden[i]))
            if i < len(self.layers) - 1:
                h = self.dropout(torch.relu(h))
        return h.squeeze(-1)
