"""CLI registration of `llm4msr refresh` (filled in by the deployment issue)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
