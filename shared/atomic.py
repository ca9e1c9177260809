"""Folder writes that are all-or-nothing: a reader never sees a half-written dataset, split or artifact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.errors import UserFacingError


def replace_dir_atomically(build, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Runs build(tmp_dir) into a sibling temp folder, then moves it into place.

    A failure inside build leaves out_dir untouched; with overwrite the old folder is only removed once the new
    one is complete.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserFacingError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
