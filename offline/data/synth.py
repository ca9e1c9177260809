"""Synthetic multi-scenario data: the embedded default dataset.

Users have latent interests over themes ("retro", "camping", ...) that are shared across scenarios. Every item
belongs to one theme and one scenario-specific category, and its title is made of the theme's words and the
category's noun, so the interest is readable in plain text. Each user is active mostly in one scenario and sparse in
the others; clicks follow the interest. A model that reads the user's history in the other scenarios (through the
titles, as the LLM does) can therefore predict clicks in a sparse scenario better than user ids alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shared.dataset.folder import SEQ, Dataset
from shared.errors import UserFacingError

THEMES: dict[str, list[str]] = {
    "outdoor": ["camping", "hiking", "mountain", "trail"],
    "kids": ["cartoon", "toddler", "playful", "rainbow"],
    "vintage": ["retro", "antique", "classic", "vintage"],
    "tech": ["smart", "wireless", "digital", "robotic"],
    "cooking": ["kitchen", "chef", "baking", "gourmet"],
    "fitness": ["yoga", "running", "workout", "athletic"],
    "music": ["guitar", "jazz", "piano", "rock"],
    "garden": ["floral", "botanical", "garden", "herbal"],
}

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "books": (
        "Online bookstore: novels, guides, handbooks, magazines and picture books",
        ["novel", "guide", "handbook", "magazine", "picture book"],
    ),
    "home": (
        "Home and living store: lamps, posters, mugs, blankets and wall clocks",
        ["lamp", "poster", "mug", "blanket", "wall clock"],
    ),
    "apparel": (
        "Clothing and accessories store: t-shirts, jackets, caps, sneakers and backpacks",
        ["t-shirt", "jacket", "cap", "sneakers", "backpack"],
    ),
    "media": (
        "Streaming video service: documentaries, movies, tutorials, series and podcasts",
        ["documentary", "movie", "tutorial", "series", "podcast"],
    ),
}


@dataclass(frozen=True)
class SynthConfig:
    users: int = 300
    scenarios: int = 3
    items_per_scenario: int = 120
    # Impressions per user in the user's main scenario and in each other scenario.
    main_impressions: int = 30
    side_impressions: int = 6
    interest_concentration: float = field(
        default=0.3, metadata={"help": "concentration of the users' theme interests: lower = more focused users"}
    )
    signal: float = field(default=2.0, metadata={"help": "how strongly interest drives clicks (logit scale)"})
    seed: int = 7

    def __post_init__(self) -> None:
        if not 1 <= self.scenarios <= len(SCENARIOS):
            raise UserFacingError(f"scenarios must be between 1 and {len(SCENARIOS)}, got {self.scenarios}")
        for name in ("users", "items_per_scenario", "main_impressions"):
            if getattr(self, name) < 1:
                raise UserFacingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.side_impressions < 0:
            raise UserFacingError(f"side_impressions must be >= 0, got {self.side_impressions}")


def generate(config: SynthConfig | None = None) -> Dataset:
    """Builds the synthetic dataset in memory (labels are explicit clicks; timestamps are per user increasing)."""
    cfg = config or SynthConfig()
    rng = np.random.default_rng(cfg.seed)
    theme_names = list(THEMES)
    n_themes = len(theme_names)
    scenario_names = list(SCENARIOS)[: cfg.scenarios]
    scenarios = pd.DataFrame({"scenario": scenario_names, "description": [SCENARIOS[s][0] for s in scenario_names]})

    item_rows = []
    item_theme = []
    item_scenario = []
    for s_idx, scenario in enumerate(scenario_names):
        nouns = SCENARIOS[scenario][1]
        for j in range(cfg.items_per_scenario):
            theme = int(rng.integers(n_themes))
            words = rng.choice(THEMES[theme_names[theme]], size=2, replace=False)
            noun = nouns[int(rng.integers(len(nouns)))]
            item_rows.append(
                {
                    "item_id": f"{scenario[0]}{j:04d}",
                    "title": f"{words[0]} {words[1]} {noun}".capitalize() + f" no. {j + 1}",
                    "category": noun,
                    "scenario": scenario,
                }
            )
            item_theme.append(theme)
            item_scenario.append(s_idx)
    items = pd.DataFrame(item_rows)
    item_theme = np.array(item_theme)
    item_scenario = np.array(item_scenario)

    interests = rng.dirichlet(np.full(n_themes, cfg.interest_concentration), size=cfg.users)
    main_scenario = rng.integers(len(scenario_names), size=cfg.users)
    scenario_bias = rng.normal(-0.3, 0.3, size=len(scenario_names))

    rows = []
    for u in range(cfg.users):
        user_id = f"u{u:05d}"
        events = []
        for s_idx in range(len(scenario_names)):
            n = cfg.main_impressions if s_idx == main_scenario[u] else cfg.side_impressions
            if n == 0:
                continue
            pool = np.flatnonzero(item_scenario == s_idx)
            # Half of the impressions follow the user's interests (a recommender's exposure), half are random.
            weights = interests[u][item_theme[pool]] + 1e-3
            by_interest = rng.choice(pool, size=n // 2, p=weights / weights.sum())
            at_random = rng.choice(pool, size=n - n // 2)
            shown = np.concatenate([by_interest, at_random])
            logit = cfg.signal * (n_themes * interests[u][item_theme[shown]] - 1.0) + scenario_bias[s_idx]
            clicks = rng.random(len(shown)) < 1.0 / (1.0 + np.exp(-logit))
            events.extend((s_idx, int(i), int(c)) for i, c in zip(shown, clicks))
        order = rng.permutation(len(events))
        t0 = 1_700_000_000 + int(rng.integers(0, 86_400))
        for rank, e in enumerate(order):
            s_idx, item, click = events[e]
            rows.append(
                {
                    "user_id": user_id,
                    "item_id": items["item_id"].iat[item],
                    "scenario": scenario_names[s_idx],
                    "label": float(click),
                    "timestamp": float(t0 + 3_600 * rank),
                }
            )
    interactions = pd.DataFrame(rows)
    interactions["label"] = interactions["label"].astype(np.float32)
    interactions[SEQ] = np.arange(len(interactions), dtype=np.int64)
    return Dataset(scenarios=scenarios, items=items, interactions=interactions, name="synthetic")
