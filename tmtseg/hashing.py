"""Content hashes of files: sha256 read in 1 MiB chunks (a file of any size in constant memory), the one helper of the
library (pretrained weights and their cache, the ONNX export's record of its checkpoint, a run's input hashes). A file
hashed once in a process is not read again while its (size, mtime_ns) stay the same."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20
_SEEN: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256, this process only


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_cached(path: str | Path) -> str:
    """`sha256`, remembered for this process by (path, size, mtime_ns): a bench or a test that starts many runs from
    one source checkpoint reads it once. A file rewritten in place gets a new mtime_ns, so it is hashed again."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SEEN:
        _SEEN[key] = sha256(path)
    return _SEEN[key]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
