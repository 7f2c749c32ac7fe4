"""Settings fields that carry their own bounds: a piece's settings dataclass declares each value's range or choices
beside its default, and the config's one validation pass (tmtseg/config/validate.py) checks them, naming the key."""

from __future__ import annotations

import dataclasses
from typing import Any

from tmtseg.errors import ConfigError


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = None,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
    choices: tuple | None = None,
) -> Any:
    """A dataclass field with its bounds: low/high inclusive, `positive` refuses 0 too, `choices` the allowed values
    (for a list: a non-empty subset of them). Every number is also checked to be finite."""
    meta = {"low": low, "high": high, "positive": positive, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_number(key: str, value: float, low: float | None, high: float | None, *, positive: bool = False) -> None:
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf
        raise ConfigError(f"config key {key}={value}: must be a finite number")
    if positive and value <= 0:
        raise ConfigError(f"config key {key}={value}: must be > 0")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"config key {key}={value}: must be {bound}")


def check_settings(prefix: str, obj: Any) -> None:
    """Check every field of a settings dataclass against the bounds its `setting` declared."""
    for f in dataclasses.fields(obj):
        key, value, meta = f"{prefix}.{f.name}", getattr(obj, f.name), f.metadata
        choices = meta.get("choices")
        if choices is not None and isinstance(value, list):
            if not value or not set(value) <= set(choices):
                raise ConfigError(f"config key {key}={value}: one or more of {', '.join(map(str, choices))}")
        elif choices is not None and value not in choices:
            raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(map(str, choices))}")
        if isinstance(value, float | int) and not isinstance(value, bool):
            check_number(key, value, meta.get("low"), meta.get("high"), positive=meta.get("positive", False))
