"""What every split reader returns (a Source: records, decoder, classes, palette) and the helpers the readers share:
slicing by order, key checks and the default colours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tmtseg.config import SplitConfig
from tmtseg.data.decode import Pair, Record
from tmtseg.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
BINARY_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)


@dataclass
class Source:
    records: list[Record]
    decoder: Callable[[Record], Pair]
    class_names: list[str]
    palette: np.ndarray  # [K, 3] uint8
    where: str  # what the split reads, for messages
    # what decodes to ignore_index, named by the data checks' warning when it covers much of a split ("" = nothing);
    # None: void by design (the retina sets' outside of the field of view), never warned about
    void: str | None = ""


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: distinct colours for any number of classes. [K, 3] uint8."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, rgb = k, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        out[k] = rgb
    return out


def slice_records(split: SplitConfig, records: list[Record], key: str) -> list[Record]:
    if split.start < 0 or (split.stop is not None and split.stop < split.start):
        raise ConfigError(f"config key {key}.start/stop=[{split.start}, {split.stop}): need 0 <= start <= stop")
    return records[split.start : split.stop]


def no_groups(split: SplitConfig, key: str, what: str) -> None:
    if split.groups:
        raise ConfigError(f"config key {key}.groups={split.groups}: {what} has no groups")


def one_of(key: str, value: object, allowed: set[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(sorted(allowed))}")
