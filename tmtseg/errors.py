"""Typed errors raised by the library; the CLI turns each into one line and its exit code."""

from __future__ import annotations


class TmtsegError(Exception):
    """Base class. `exit_code` is what the CLI exits with (documented in the README)."""

    exit_code = 1


class ConfigError(TmtsegError):
    """A bad config key or value (names the key)."""

    exit_code = 2


class DataError(TmtsegError):
    """A missing, unreadable or malformed data file (names the file)."""

    exit_code = 2


class CheckpointError(TmtsegError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""

    exit_code = 3


class TrainingError(TmtsegError):
    """Training cannot go on (e.g. a non-finite loss); names the step and the last good checkpoint."""

    exit_code = 4


class Preempted(TmtsegError):
    """SIGTERM arrived: the current step finished and a checkpoint was saved (exit 128 + 15)."""

    exit_code = 143


class MissingExtra(TmtsegError):
    """An optional feature whose packages are not installed (names the pip extra to install)."""

    exit_code = 2


class ExportError(TmtsegError):
    """An ONNX export failed, or its output differs from PyTorch's beyond the tolerances; nothing was written."""

    exit_code = 5
