"""The one-request forward traced into TorchScript graphs, one per scenario and knowledge layout.

A ranking request is small (one user, one scenario, N candidates), and the eager forward spends most of its time
dispatching ~100 small torch ops from Python: run as a traced graph the same ops take about half the time at 100
candidates (bench/serve_bench.py --variants llm4msr,llm4msr@eager). A trace records what one call did, so a graph is
only as general as that call:
- the scenario index: a backbone's one-scenario fast path branches on it in Python, so each scenario gets a graph;
- which knowledge tensors were passed (scenario, user, raw item vectors, reduced item rows): part of the key;
- the candidate count: not part of the key; each graph is checked on other counts and on a missing (NaN) item row
  before it is used.
A graph that fails to trace or whose scores differ from the eager forward by more than CHECK_TOLERANCE on the check
inputs is never used: that key stays eager, with one warning in the log.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# The optional tensors of a request, in the graphs' argument order; the per-candidate ones have N rows, the others 1.
OPTIONAL_INPUTS = ("scenario", "user", "item", "item_reduced")
PER_CANDIDATE = ("item", "item_reduced")
# Largest |traced - eager| / (1 + |eager|) logit accepted on the check inputs (the graphs run the eager ops
# unoptimized: the difference is 0 on every backbone; the margin only allows for kernels that vary by call).
CHECK_TOLERANCE = 1e-5

# fields [N, F], scenario [N], knowledge {level: tensor or None}, reduced item rows or None -> logits [N]
Forward = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None], torch.Tensor | None], torch.Tensor]
GraphKey = tuple[int, tuple[str, ...]]


class RequestGraphs:
    """forward() for one request, through a traced graph per (scenario, present inputs) where one checks out.

    The module behind forward must not change after the first call: its weights become constants of the graphs.
    Thread-safe: graphs are built under a lock, and a built graph may run in several threads at once.
    """

    def __init__(self, forward: Forward):
        self._forward = forward
        self._graphs: dict[GraphKey, torch.jit.ScriptFunction | None] = {}  # None: this key runs eagerly
        self._lock = threading.Lock()

    def __call__(
        self,
        fields: torch.Tensor,
        scenario: torch.Tensor,
        knowledge: dict[str, torch.Tensor | None],
        item_reduced: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [N] for one request (every row of scenario holds the same index)."""
        inputs = {**knowledge, "item_reduced": item_reduced}
        present = tuple(name for name in OPTIONAL_INPUTS if inputs.get(name) is not None)
        key = (int(scenario[0]), present)
        graph = self._graphs.get(key, _MISSING)
        if graph is _MISSING:
            graph = self._build(key, fields, scenario, inputs)
        if graph is None:
            return self._forward(fields, scenario, knowledge, item_reduced)
        with torch.jit.optimized_execution(False):  # thread-local; see _build
            return graph(fields, scenario, *(inputs[name] for name in present))

    @property
    def graphs(self) -> dict[GraphKey, bool]:
        """Every key seen so far: True when it runs as a graph, False when it runs eagerly."""
        return {key: graph is not None for key, graph in self._graphs.items()}

    def _eager(self, present: tuple[str, ...]) -> Callable[..., torch.Tensor]:
        """forward() with the present optional inputs as positional tensors (what a trace takes)."""

        def flat(fields: torch.Tensor, scenario: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            given = dict(zip(present, tensors, strict=True))
            knowledge = {level: given.get(level) for level in ("scenario", "user", "item")}
            return self._forward(fields, scenario, knowledge, given.get("item_reduced"))

        return flat

    def _build(
        self, key: GraphKey, fields: torch.Tensor, scenario: torch.Tensor, inputs: dict[str, torch.Tensor | None]
    ) -> torch.jit.ScriptFunction | None:
        with self._lock:
            if key in self._graphs:
                return self._graphs[key]
            present = key[1]
            eager = self._eager(present)
            args = (fields, scenario, *(inputs[name] for name in present))
            graph: torch.jit.ScriptFunction | None = None
            try:
                # Without the executor's optimization passes a graph runs exactly the eager ops (same float results);
                # with them it fused ops and moved PEPNet's and PLE's logits by up to 1e-3, for no measured gain.
                with (
                    torch.inference_mode(False),
                    torch.no_grad(),
                    torch.jit.optimized_execution(False),
                    warnings.catch_warnings(),
                ):
                    warnings.simplefilter("ignore")  # tracer notes on Python values it records as constants
                    args = tuple(a.clone() for a in args)  # normal tensors: inference tensors cannot be traced
                    graph = torch.jit.trace(eager, args, check_trace=False)
                    worst = max(_difference(graph(*a), eager(*a)) for a in _check_inputs(args, present))
                if not worst <= CHECK_TOLERANCE:
                    log.warning(
                        "traced request graph for scenario %d (%s) differs from the eager forward by %.2g: kept eager",
                        key[0],
                        ", ".join(present) or "no knowledge",
                        worst,
                    )
                    graph = None
            except Exception as exc:  # noqa: BLE001 (any tracing failure: the eager forward is always correct)
                log.warning("could not trace the request forward for scenario %d: %s; kept eager", key[0], exc)
                graph = None
            self._graphs[key] = graph
            return graph


def _difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |got - expected| / (1 + |expected|); inf when the shapes differ."""
    if got.shape != expected.shape:
        return float("inf")
    both_nan = torch.isnan(got) & torch.isnan(expected)
    diff = torch.where(both_nan, 0.0, (got - expected).abs() / (1 + expected.abs()))
    return float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0


def _check_inputs(args: tuple[torch.Tensor, ...], present: tuple[str, ...]) -> list[tuple[torch.Tensor, ...]]:
    """The traced call itself, its first row alone, and its rows repeated to 2N + 1 with the last candidate's item
    knowledge missing (NaN): other counts, and the missing-vector path."""
    fields, scenario, *tensors = args
    n = len(fields)
    one = (fields[:1], scenario[:1], *(_rows(t, name, slice(0, 1)) for t, name in zip(tensors, present, strict=True)))
    idx = torch.arange(2 * n + 1) % n
    more = [fields[idx], scenario[idx]]
    for t, name in zip(tensors, present, strict=True):
        t = _rows(t, name, idx).clone()
        if name in PER_CANDIDATE:
            t[-1] = float("nan")
        more.append(t)
    return [args, one, tuple(more)]


def _rows(t: torch.Tensor, name: str, rows: slice | torch.Tensor) -> torch.Tensor:
    """The candidate rows of a per-candidate input; request-wide ones ([1, d]) are passed unchanged."""
    return t[rows] if name in PER_CANDIDATE else t


_MISSING = object()
