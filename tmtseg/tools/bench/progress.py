"""The bench's progress bar: a tqdm bar redrawn in place on a terminal; in a log file (`tmtseg bench ... > bench.log
2>&1`), one line per update, each written once.

tqdm draws to a file as it draws to a terminal: `\\r` and the bar, again at its creation, at every refresh and at its
close, so a log gets one endless line in which the first and the last state stand twice. To a file the bar here writes
a line (ending in a newline) when the progress or the running runs changed since the last line it wrote: when a run
ends, or once a minute while runs are going."""

from __future__ import annotations

import io
import sys
import time

from tqdm import tqdm


class BenchProgress:
    """`update(n, note, force=)` after each poll of the runs, `close()` at the end; `enabled=False` writes nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool, every_s: float = 60.0, clock=time.monotonic):
        self.enabled, self.clock = enabled, clock
        self.terminal = sys.stderr.isatty()
        self.every_s = 0.0 if self.terminal else every_s  # on a terminal: each poll, as tqdm does
        # to a file tqdm draws into a sink, and the lines are written here from its formatted state
        sink = sys.stderr if self.terminal else io.StringIO()
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled, file=sink)
        self._written: tuple[int, str] | None = None  # (n, note) of the last line in the log
        self._at = float("-inf")  # clock() at the last draw

    def update(self, n: int, note: str, *, force: bool = False) -> None:
        """Set the finished work and the note on the running runs; draw if forced (a run ended) or the interval
        passed."""
        if not self.enabled:
            return
        self.bar.n = n
        self.bar.set_postfix_str(note, refresh=False)
        if force or self.clock() - self._at >= self.every_s:
            self._draw()
            self._at = self.clock()

    def close(self) -> None:
        """The last state: on a terminal tqdm leaves its bar; in a log, a line only if it is not there yet."""
        if not self.enabled:
            return
        if not self.terminal:
            self._draw()
        self.bar.close()

    def _draw(self) -> None:
        if self.terminal:
            self.bar.refresh()
            return
        state = (self.bar.n, self.bar.postfix or "")
        if state != self._written:
            sys.stderr.write(str(self.bar).rstrip() + "\n")
            sys.stderr.flush()
            self._written = state
