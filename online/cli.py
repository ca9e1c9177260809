"""CLI registration of `llm4msr serve` (filled in by the serving issue)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
