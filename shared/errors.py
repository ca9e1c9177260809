"""Errors that the CLI and the service report to people as one clear line."""

from __future__ import annotations

from collections.abc import Iterable


class UserFacingError(Exception):
    """An error caused by input or configuration; its message says what is wrong and where."""


class DatasetError(UserFacingError):
    """A dataset file is malformed; names the file, the line and the column when known."""

    def __init__(self, file: str, message: str, line: int | None = None, column: str | None = None):
        self.file = file
        self.line = line
        self.column = column
        self.reason = message
        where = file
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserFacingError:
    """The one-line error of a registry lookup that missed: names what was asked for and every valid choice."""
    return UserFacingError(f"unknown {kind} {name!r}; choose one of {', '.join(known)}")
