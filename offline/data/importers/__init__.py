"""Importers of public datasets into the dataset folder format, looked up by source name (registry.py).

Adding one: a module with its options dataclass, its load function and an IMPORTER (ImporterSpec), plus its entry
in the tuple below; `llm4msr data import` takes its sources and their flags from the registry.
"""

from __future__ import annotations

from offline.data.importers import amazon, folder, kuaisar, movielens
from offline.data.importers.registry import (
    ImporterSpec,
    importer_names,
    importer_spec,
    register_importer,
    unregister_importer,
)

for _module in (movielens, amazon, kuaisar, folder):
    register_importer(_module.IMPORTER)

__all__ = ["ImporterSpec", "importer_names", "importer_spec", "register_importer", "unregister_importer"]
