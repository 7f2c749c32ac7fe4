"""Whole files or none: an output is written beside its target under a hidden name and renamed over it, so that a
kill, a full disk or a SIGTERM mid-write leaves the old file (or no file), never part of a new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole output to `tmp` (a hidden file in `target`'s folder, so the rename stays on one
    file system and is atomic); then it replaces `target`. On any error, or a signal turned into an exception, the
    temporary file goes and `target` is as it was."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
