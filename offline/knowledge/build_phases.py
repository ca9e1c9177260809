"""The phases of a build: generate (scenario, user and fit user answers, generate mode only), then embed every
table (the three levels and the fit user table, docs/architecture.md, Knowledge snapshot).

Each phase runs the table's pending rows (those the parent cannot lend) shard by shard through the executor,
writes each finished shard as its work file, and on a rerun reads the shards already finished instead of computing
them again. It counts the texts the backend cuts to max_length and measures texts and tokens per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offline.knowledge.backends.base import encoded_lengths, input_lengths
from offline.knowledge.build_plan import BuildPlan, RawVectors, TableWork
from offline.knowledge.build_shards import plan_shards, read_shard, shard_path, write_shard
from offline.knowledge.executor import Executor
from shared.knowledge.snapshot import USER_FIT

# A phase's name in the shard files, and the backend operation it runs.
PHASE_OPS = {"gen": "generate", "emb": "embed"}

# Called as (table, phase, shard index) after each shard is written (tests follow a resumed build with it); table is
# a level or USER_FIT.
ShardCallback = Callable[[str, str, int], None]
# row index -> (answer, vector; None for a generate phase)
PhaseResults = dict[int, tuple[str, np.ndarray | None]]


@dataclass(frozen=True)
class ComputedKnowledge:
    """What the LLM phases produced: raw vectors per table and id, and how the phases went."""

    vectors: RawVectors
    # Texts cut to max_length, per "<table>_<generate|embed>" (every pending row, resumed or not).
    truncated: dict[str, int]
    # "<table>_<op>_per_s", "<table>_<op>_tokens_per_s" (and "_new_tokens_per_s" when generating).
    rates: dict[str, float]


def run_phases(
    plan: BuildPlan, executor_factory: Callable[[], Executor], on_shard: ShardCallback | None = None
) -> ComputedKnowledge:
    """Generates the answers of the scenario, user and fit user tables (generate mode), then embeds every table: the
    prompt followed by its answer, or the text alone. Every generation runs before the first embedding (vllm frees
    its generating engine in between). The executor starts at the first shard to compute and is closed even when a
    phase fails."""
    runner = PhaseRunner(plan, executor_factory, on_shard)
    try:
        answers = {table: runner.generate(work) for table, work in plan.tables.items() if work.generate}
        if answers:
            runner.end_generation()
        vectors = {table: runner.embed(work, answers.get(table, {})) for table, work in plan.tables.items()}
    finally:
        runner.close()
    return ComputedKnowledge(vectors, runner.truncated, runner.rates)


class PhaseRunner:
    """Runs the phases of one build; the tokenizer (token counts) and the executor start only when needed."""

    def __init__(self, plan: BuildPlan, executor_factory: Callable[[], Executor], on_shard: ShardCallback | None):
        self.plan = plan
        self.config = plan.config
        self._executor_factory = executor_factory
        self._on_shard = on_shard
        self._executor: Executor | None = None
        self._tokenizer = None
        self.truncated: dict[str, int] = {}
        self.rates: dict[str, float] = {}

    def generate(self, work: TableWork) -> dict[int, str]:
        """The answer of every pending row."""
        inputs = {i: work.texts[i] for i in work.pending()}
        return {i: answer for i, (answer, _) in self._run(work, "gen", inputs, {}).items()}

    def embed(self, work: TableWork, answers: dict[int, str]) -> dict[str, tuple[str, np.ndarray]]:
        """id -> (answer, raw vector) of every pending row; generate mode (the paper's) embeds prompt + answer."""
        pending = work.pending()
        if work.generate:
            inputs = {i: work.texts[i] + " " + answers[i] for i in pending}
        else:
            inputs = {i: work.texts[i] for i in pending}
        return {work.ids[i]: result for i, result in self._run(work, "emb", inputs, answers).items()}

    def end_generation(self) -> None:
        if self._executor is not None:
            self._executor.end_generation()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()

    def _run(self, work: TableWork, phase: str, inputs: dict[int, str], answers: dict[int, str]) -> PhaseResults:
        """One phase over the pending rows (inputs: row -> model input); answers go beside embedded vectors."""
        op = PHASE_OPS[phase]
        pending = work.pending()
        # Shards follow the prompts' lengths in both phases, so a resumed build plans the same shards.
        shards = plan_shards(pending, [len(t) for t in work.texts], self.config.shard_size)
        tokens = self._model_tokens(f"{work.table}_{op}", op, pending, inputs)
        results, todo = self._finished(work, phase, shards)
        if todo:
            seconds = self._compute(work, phase, shards, todo, inputs, answers, results)
            done = [i for k in todo for i in shards[k]]
            self._record_rates(work.table, op, done, tokens, results, seconds)
        return results

    def _model_tokens(self, key: str, op: str, rows: list[int], inputs: dict[int, str]) -> dict[int, int]:
        """Tokens the model sees per row (after the cut to max_length); counts the texts the backend will cut (all
        pending rows, resumed or not) into truncated[key]."""
        self.truncated[key] = 0
        if not rows:
            return {}
        max_length = self.config.backend.max_length
        lengths = input_lengths(self._tokenizer_once(), [inputs[i] for i in rows], op, self.config.backend)
        self.truncated[key] = sum(n > max_length for n in lengths)
        return {i: min(n, max_length) for i, n in zip(rows, lengths, strict=True)}

    def _finished(self, work: TableWork, phase: str, shards: list[list[int]]) -> tuple[PhaseResults, list[int]]:
        """(the results of the shards whose work file exists with the same rows, the indices of the others)."""
        results: PhaseResults = {}
        todo: list[int] = []
        for k, rows in enumerate(shards):
            path = self._shard_path(work, phase, k)
            if path.exists():
                ids, responses, emb = read_shard(path)
                if ids == [work.ids[i] for i in rows]:
                    for j, i in enumerate(rows):
                        results[i] = (responses[j], None if emb is None else emb[j])
                    continue
            todo.append(k)
        return results, todo

    def _compute(
        self,
        work: TableWork,
        phase: str,
        shards: list[list[int]],
        todo: list[int],
        inputs: dict[int, str],
        answers: dict[int, str],
        results: PhaseResults,
    ) -> float:
        """Runs the unfinished shards, writing each as it finishes, into results; returns the seconds taken."""
        from tqdm import tqdm

        op = PHASE_OPS[phase]
        bar = tqdm(
            total=sum(len(shards[k]) for k in todo),
            desc=f"{_phase_label(work.table)} {op}",
            unit="user" if work.table == USER_FIT else work.table,
            disable=not self.config.progress,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        texts = [[inputs[i] for i in shards[k]] for k in todo]
        for n, result in self._executor_once().map(op, texts, self.config.pooling, progress=bar.update):
            k = todo[n]
            rows = shards[k]
            ids = [work.ids[i] for i in rows]
            if op == "generate":
                write_shard(self._shard_path(work, phase, k), ids, list(result), None)
                for j, i in enumerate(rows):
                    results[i] = (result[j], None)
            else:
                responses = [answers.get(i, "") for i in rows]
                write_shard(self._shard_path(work, phase, k), ids, responses, result)
                for j, i in enumerate(rows):
                    results[i] = (responses[j], result[j])
            if self._on_shard is not None:
                self._on_shard(work.table, phase, k)
        bar.close()
        return max(time.perf_counter() - start, 1e-9)

    def _record_rates(
        self, table: str, op: str, rows: list[int], tokens: dict[int, int], results: PhaseResults, seconds: float
    ) -> None:
        n_tokens = sum(tokens[i] for i in rows)
        if op == "generate":
            new = sum(encoded_lengths(self._tokenizer_once(), [results[i][0] for i in rows], op))
            self.rates[f"{table}_{op}_new_tokens_per_s"] = new / seconds
            n_tokens += new
        self.rates[f"{table}_{op}_per_s"] = len(rows) / seconds
        # Prompt (+ generated) tokens per second: comparable across levels and with a bare forward of the model.
        self.rates[f"{table}_{op}_tokens_per_s"] = n_tokens / seconds

    def _shard_path(self, work: TableWork, phase: str, k: int) -> Path:
        return shard_path(self.plan.work_dir, work.table, phase, k)

    def _tokenizer_once(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.plan.model_path))
        return self._tokenizer

    def _executor_once(self) -> Executor:
        if self._executor is None:
            self._executor = self._executor_factory()
        return self._executor


def _phase_label(table: str) -> str:
    """The progress bar's name of a table: the fit phase reads "user fit"."""
    return "user fit" if table == USER_FIT else table
