"""The tables of the extension points: a name -> an entry (a builder, a recipe, a settings class), read by the config
validation, the CLI, the bench and the docs. Each table is a plain dict filled in one place (see docs/architecture.md):
methods and their pieces in tmtseg/adapt/registry.py, backbones and pixel decoders in tmtseg/modeling/build.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tmtseg.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A named table; `lookup` names the config key and the known names when a name is missing."""

    def __init__(self, what: str, entries: dict[str, T] | None = None):
        super().__init__(entries or {})
        self.what = what

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `table[name] = entry`, refusing a name twice (two entries would shadow each other)."""

        def add(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self[name] = entry
            return entry

        return add

    def lookup(self, name: str, *, key: str) -> T:
        """The entry of `name`; a ConfigError naming the config key and the choices when there is none."""
        if name not in self:
            raise ConfigError(f"config key {key}={name!r}: must be one of {', '.join(self)} (the {self.what} table)")
        return self[name]
