"""Reading, merging and writing configs: defaults <- YAML files <- `a.b=value` overrides, then validated."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tmtseg import dist
from tmtseg.adapt.registry import METHOD_ALIASES
from tmtseg.config.schema import Config
from tmtseg.config.validate import validate
from tmtseg.errors import ConfigError


@functools.cache
def _defaults():
    """The defaults as an OmegaConf node, built once per process: a copy costs a sixth of building it again."""
    return OmegaConf.structured(Config)


def _schema():
    return copy.deepcopy(_defaults())


def _as_config(node) -> Config:
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def _omega_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    return f"config key {key}: {msg}" if key else msg


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- each YAML file in order <- ``a.b=value`` overrides; validated."""
    merged = _schema()
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: {'a folder, not a config file' if p.is_dir() else 'config file not found'}")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) file; a config file is YAML") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        try:
            merged = OmegaConf.merge(merged, data)
            _as_config(merged)  # resolves ${...} interpolations now, so an error names this file
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_omega_message(err)}") from None
    OmegaConf.resolve(merged)  # the files' ${...} resolved before the overrides, which set plain values over them
    return _over(merged, overrides)


def load_config_over(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``a.b=value`` overrides to an existing config (e.g. one read from a checkpoint).

    All at once, the config copied once (OmegaConf.merge of several configs merges them in order, as one merge each
    would); only when that fails are they applied one by one, so that the error names the override. A merge copies
    the whole config: one per override was most of a bench's planning and of a command's start."""
    return _over(OmegaConf.structured(cfg), overrides)


def _over(node, overrides: list[str] | tuple[str, ...]) -> Config:
    """The overrides merged over a config node (not changed) -> a new, validated Config. load_config passes its merged
    files' node straight here: a round trip through the dataclass cost two fifths of a load."""
    try:
        if not all("=" in item for item in overrides):
            raise ValueError("an override without '='")  # said by the one-by-one pass, at its place in the list
        merged = OmegaConf.merge(node, *(OmegaConf.from_dotlist([item]) for item in overrides))
        cfg = _as_config(merged)  # always a new object, as callers may edit it
    except (ValueError, OmegaConfBaseException, yaml.YAMLError):
        cfg = _merge_one_by_one(node, overrides)
    if cfg.adapt.method in METHOD_ALIASES:
        cfg = _resolve_alias(cfg)
    return validate(cfg)


def _merge_one_by_one(node, overrides: list[str] | tuple[str, ...]) -> Config:
    """The overrides merged in order, each checked: the first that fails is a ConfigError naming it."""
    merged = node
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            _as_config(merged)  # resolves ${...} interpolations now, so an error names this override
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_omega_message(err)}") from None
        except yaml.YAMLError as err:  # a YAML tag (!!python/...) in the value: never constructed
            raise ConfigError(f"override {item!r}: not a plain value ({str(err).splitlines()[0]})") from None
    return _as_config(merged)


def _resolve_alias(cfg: Config) -> Config:
    """`adapt.method=recommended` (an alias of METHOD_ALIASES) -> its method and overrides, said in one line."""
    alias = METHOD_ALIASES[cfg.adapt.method]
    if dist.is_main():
        print(f"{cfg.adapt.method} = {alias.why}", flush=True)
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist([f"adapt.method={alias.method}"]))
    for item in alias.overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    return _as_config(merged)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from its saved dict (run folder, checkpoint); unknown keys are errors."""
    try:
        return validate(_as_config(OmegaConf.merge(_schema(), data)))
    except OmegaConfBaseException as err:
        raise ConfigError(_omega_message(err)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b' lines."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in x.keys() | y.keys():
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]}: {x!r} -> {y!r}")

    walk(to_dict(a), to_dict(b), "")
    return sorted(out)
