"""Registers the offline subcommands (data, knowledge, train, evaluate, compare, refresh) on the `llm4msr` CLI."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from offline.data.cli import register as register_data
    from offline.knowledge.cli import register as register_knowledge
    from offline.refresh.cli import register as register_refresh
    from offline.training.cli import register as register_training

    register_data(sub)
    register_knowledge(sub)
    register_training(sub)
    register_refresh(sub)
