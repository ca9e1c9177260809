"""Optional locally, required in CI: a missing dependency skips a test on a user's clone but fails it under CI=true,
so that CI can never pass without having run the check."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(present: object, reason: str) -> None:
    """Skip (locally) or fail (CI=true) the calling test when `present` is falsy."""
    if present:
        return
    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)
