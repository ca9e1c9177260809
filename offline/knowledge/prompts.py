"""Every prompt text of the knowledge job, in one place (docs/architecture.md, Knowledge snapshot).

The exact template text is hashed into the manifest (`template_sha256`): vectors built from different wording live
in different knowledge spaces. Every scenario and user prompt starts with the same scenario preamble, so that it is
computed once: vLLM's prefix caching and the hf backend's shared-prefix reuse find it. The preamble ends with a
newline and every part after it starts with one; the tokens of the whole prompt therefore start with the preamble's
own tokens, also inside the chat template (checked for SmolLM2 and the test model in tests/test_knowledge_prefix.py).

User prompts see only `Split.train_positives()`: anything later would leak validation/test labels into knowledge.
The "fit" user prompts of the leak-free protocol use the same template on a user's early train positives only
(offline/data/fit_cutoff.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from offline.data.split import Split
from offline.knowledge.options import cli
from shared.dataset.folder import Dataset

PREAMBLE = (
    "You are an expert in multi-scenario recommendation. A platform serves the same users in several scenarios:\n"
    "{scenario_lines}\n"
)
SCENARIO_LINE = "- {scenario}: {description}"

SCENARIO_QUESTION = (
    "\nFocus on the scenario '{scenario}'. Describe what users look for in this scenario, which kinds of items "
    "matter most there, and how this scenario is correlated with the other scenarios (shared interests, "
    "complementary needs, differences).\nAnswer:"
)

USER_HISTORY_HEADER = "\nA user's recent interactions, grouped by scenario (oldest first, newest last):\n"
USER_SCENARIO_HEADER = "[{scenario}] ({count} interactions in total)\n"
USER_ITEM_LINE = "- {title}{category}\n"
USER_ITEM_CATEGORY = " (category: {category})"
USER_NO_HISTORY = "[{scenario}] no interactions\n"
USER_QUESTION = (
    "\nDescribe this user's interests in each scenario, and the preferences the user shares across scenarios "
    "(tastes, price level, style, purposes). Then say which items the user is likely to choose next.\nAnswer:"
)

ITEM_TEXT = "Item: {title}{category}"
ITEM_CATEGORY = "\nCategory: {category}"

TEMPLATES = {
    "preamble": PREAMBLE,
    "scenario_line": SCENARIO_LINE,
    "scenario_question": SCENARIO_QUESTION,
    "user_history_header": USER_HISTORY_HEADER,
    "user_scenario_header": USER_SCENARIO_HEADER,
    "user_item_line": USER_ITEM_LINE,
    "user_item_category": USER_ITEM_CATEGORY,
    "user_no_history": USER_NO_HISTORY,
    "user_question": USER_QUESTION,
    "item_text": ITEM_TEXT,
    "item_category": ITEM_CATEGORY,
}


@dataclass(frozen=True)
class PromptConfig:
    """How much history a user prompt shows."""

    # Most recent titles per scenario (the paper's prompts list recent behaviour per scenario).
    max_items_per_scenario: int = 20
    # Token budget of the history part; the oldest titles of the longest scenario list are dropped first.
    history_token_budget: int = 256
    # Longest title kept, in characters (some catalogues have paragraph-long titles).
    max_title_chars: int = field(default=120, metadata=cli(hidden=True))

    def to_dict(self) -> dict:
        return {
            "max_items_per_scenario": self.max_items_per_scenario,
            "history_token_budget": self.history_token_budget,
            "max_title_chars": self.max_title_chars,
        }


def template_sha256(config: PromptConfig | None = None, templates: dict[str, str] | None = None) -> str:
    """Hash of the template text and the prompt settings: any change makes a new knowledge space."""
    h = hashlib.sha256()
    for name, text in sorted((templates or TEMPLATES).items()):
        h.update(name.encode() + b"\x00" + text.encode() + b"\x00")
    h.update(repr(sorted((config or PromptConfig()).to_dict().items())).encode())
    return h.hexdigest()


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def preamble(dataset: Dataset) -> str:
    lines = [
        SCENARIO_LINE.format(scenario=row.scenario, description=row.description.strip())
        for row in dataset.scenarios.itertuples(index=False)
    ]
    return PREAMBLE.format(scenario_lines="\n".join(lines))


def scenario_prompts(dataset: Dataset) -> dict[str, str]:
    """One prompt per scenario: every scenario's description, then the question about this one."""
    head = preamble(dataset)
    return {s: head + SCENARIO_QUESTION.format(scenario=s) for s in dataset.scenario_names}


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def item_texts(dataset: Dataset) -> dict[str, str]:
    """What the item level embeds (encode mode): title and category."""
    out = {}
    for row in dataset.items.itertuples(index=False):
        category = ITEM_CATEGORY.format(category=row.category.strip()) if row.category.strip() else ""
        out[row.item_id] = ITEM_TEXT.format(title=" ".join(row.title.split()), category=category)
    return out


TokenCounter = Callable[[Sequence[str]], list[int]]


def approx_token_counter(texts: Sequence[str]) -> list[int]:
    """A tokenizer-free estimate (~4 characters per token) for callers without a model."""
    return [max(1, (len(t) + 3) // 4) for t in texts]


def user_prompts(
    dataset: Dataset,
    split: Split,
    config: PromptConfig | None = None,
    count_tokens: TokenCounter = approx_token_counter,
    users: Sequence[str] | None = None,
    history: pd.DataFrame | None = None,
) -> dict[str, str]:
    """One prompt per user from TRAIN positives only: per scenario the most recent K titles, newest last.

    history: the rows to show, in time order (a subset of split.train_positives(), e.g. fit_cutoff.fit_history for
    the fit prompts); default all train positives. The budget is enforced with the model's own token counts of each
    history line (computed once per item).
    """
    config = config or PromptConfig()
    head = preamble(dataset)
    history = (split.train_positives() if history is None else history)[["user_id", "item_id", "scenario"]]
    if users is None:
        users = sorted(dataset.interactions["user_id"].unique().tolist())

    items = dataset.items.set_index("item_id")
    used_items = pd.unique(history["item_id"])
    lines = {}
    for item_id in used_items:
        row = items.loc[item_id]
        category = row["category"].strip()
        cat = USER_ITEM_CATEGORY.format(category=_clip(category, 60)) if category else ""
        lines[item_id] = USER_ITEM_LINE.format(title=_clip(row["title"], config.max_title_chars), category=cat)
    line_ids = list(lines)
    line_tokens = dict(zip(line_ids, count_tokens([lines[i] for i in line_ids]), strict=True))

    # Per user and scenario, the positions of the rows in time order (train_positives keeps time order).
    grouped: dict[str, dict[str, list[str]]] = {}
    for user, item, scenario in history.itertuples(index=False):
        grouped.setdefault(user, {}).setdefault(scenario, []).append(item)

    scenarios = dataset.scenario_names
    out = {}
    for user in users:
        per = grouped.get(user, {})
        counts = {s: len(per.get(s, [])) for s in scenarios}
        kept = {s: per.get(s, [])[-config.max_items_per_scenario :] for s in scenarios}
        total = sum(line_tokens[i] for s in scenarios for i in kept[s])
        while total > config.history_token_budget:
            longest = max(scenarios, key=lambda s: (len(kept[s]), -scenarios.index(s)))
            if len(kept[longest]) <= 1:
                break
            total -= line_tokens[kept[longest][0]]
            kept[longest] = kept[longest][1:]
        parts = [head, USER_HISTORY_HEADER]
        for s in scenarios:
            if not kept[s]:
                parts.append(USER_NO_HISTORY.format(scenario=s))
                continue
            parts.append(USER_SCENARIO_HEADER.format(scenario=s, count=counts[s]))
            parts.extend(lines[i] for i in kept[s])
        parts.append(USER_QUESTION)
        out[user] = "".join(parts)
    return out
