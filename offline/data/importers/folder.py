"""The `folder` importer: a folder already in the dataset format, validated and copied."""

from __future__ import annotations

from dataclasses import dataclass, field

from offline.data.importers.registry import ImporterSpec
from shared.dataset.folder import Dataset, read_dataset


@dataclass(frozen=True)
class FolderOptions:
    path: str = field(metadata={"positional": True})


def load(options: FolderOptions) -> Dataset:
    return read_dataset(options.path)


IMPORTER = ImporterSpec(
    name="folder",
    help="validate and copy a folder that is already in the dataset format",
    options_class=FolderOptions,
    load=load,
)
