"""One writer per run folder: an advisory lock on ``<output_dir>/.lock`` held for the whole of a training run.

The lock is an ``flock`` on an open file, so the kernel drops it when its process dies however it dies (kill -9
included): a lock left by a dead process is free to take, with no stale-pid guessing. The file also records who holds
it (pid, host, start time, command), for the message a second writer gets. Under DDP only rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from tmtseg.errors import ConfigError

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds
_FORK_HOOK = False


def _close_in_child() -> None:
    """A forked child (a data-loader worker) closes its copies of the lock descriptors: the lock then dies with the
    process that took it, not with the last worker, which may outlive a kill -9 of its parent by seconds. (Closing a
    copy never unlocks: an flock lives until its last descriptor is closed, and the parent keeps its own.)"""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


class RunLock:
    """Hold the lock of `run_dir` (created if missing) until `release()`; refuse at once if another process holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:  # a file in the way, no permission, a read-only disk: the user's choice of folder
            raise ConfigError(
                f"config key output_dir={run_dir}: cannot write the run folder ({err.strerror})"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            os.close(self._fd)
            raise ConfigError(
                f"config key output_dir={run_dir}: in use by another run ({holder}); wait for it to finish or set"
                " another output_dir"
            ) from None
        global _FORK_HOOK
        if not _FORK_HOOK:  # once per process, at the first lock (no side effect on import)
            os.register_at_fork(after_in_child=_close_in_child)
            _FORK_HOOK = True
        _HELD.add(self._fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        try:  # rewritten in place: the holder's record is replaced only by the next holder
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(record).encode(), 0)
        except OSError as err:
            self.release()
            raise ConfigError(
                f"config key output_dir={run_dir}: cannot write the run folder ({err.strerror})"
            ) from None

    def _holder(self) -> str:
        try:
            record = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
            return f"pid {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
        except (OSError, ValueError, KeyError, TypeError):  # the holder is between open and writing its record
            return f"see {self.path}"

    def release(self) -> None:
        if self._fd >= 0:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing drops the flock; the file stays (deleting it would race a new taker)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
