"""Third-party output during a library call that talks on its own (the ONNX exporter and its optimiser,
onnxruntime): its Python log records and whatever it writes to the process's stderr at C level are caught, and the
lines that tell the user something are said again once each through `warnings`, so `tmtseg` prints them with its own
prefix (`tmtseg: warning: ...`) among its messages; notes that say nothing to the user (the exporter's optimiser
listing the nodes it did not fold) are dropped. Our own messages never pass through here."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# lines that say nothing a user can act on: onnxscript's constant folding notes, one per op it leaves alone
NOISE = (re.compile(r"^Skipping constant folding for "),)


class _Collect(logging.Handler):
    """Keeps the WARNING and above records of every logger while it is the root logger's handler (with a handler
    there, logging's last-resort handler, which prints the bare message, stays silent)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[tuple[str, str]] = []  # (who, message)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


@contextmanager
def library_output(what: str, *, noise: tuple[re.Pattern, ...] = NOISE) -> Iterator[None]:
    """Catch third-party output around a call (`what` names it in the re-said lines): Python logging records and
    file descriptor 2 (C and C++ libraries write there directly, past sys.stderr). On the way out, even when the call
    raised, each line that is not noise is warned once."""
    handler = _Collect()
    root = logging.getLogger()
    others, root.handlers = root.handlers, [handler]  # the only one for now (the CLI's would say the noise too)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            root.handlers = others
            tmp.seek(0)
            raw = [("stderr", line) for line in tmp.read().decode(errors="replace").splitlines()]
            _say_once(what, [*handler.lines, *raw], noise)


def _say_once(what: str, lines: list[tuple[str, str]], noise: tuple[re.Pattern, ...]) -> None:
    said: set[str] = set()
    for who, message in lines:
        message = " ".join(message.split())  # one line, whatever the library wrote
        if not message or message in said or any(p.search(message) for p in noise):
            continue
        said.add(message)
        warnings.warn(f"{what} ({who}): {message}", stacklevel=3)
