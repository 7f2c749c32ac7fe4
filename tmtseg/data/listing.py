"""What every split reader returns (a Source: records, decoder, classes, palette) and the helpers the readers share:
slicing by order, key checks and the default colours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmtseg.config import SplitConfig
from tmtseg.data.decode import Pair, Record
from tmtseg.errors import ConfigError, DataError

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


def keep_listed(split: SplitConfig, records: list[Record], key: str) -> list[Record]:
    """The records `split.files` names (a record's name, its image's file name or stem), in the split's order; a
    listed name the split does not hold is a DataError naming it (a list made for another folder or slice)."""
    path = Path(split.files)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise DataError(f"config key {key}.files={split.files}: cannot read the list of images ({reason})") from None
    wanted = [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]
    keys = {r: {r.name, *((r.image.name, r.image.stem) if r.image else ())} for r in records}
    known = set().union(*keys.values()) if keys else set()
    missing = [w for w in wanted if w not in known]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"config key {key}.files={split.files}: {', '.join(missing[:3])}{more} not in the split (kind"
            f" {split.kind}); was the list made for another folder or slice?"
        )
    chosen = set(wanted)
    return [r for r in records if keys[r] & chosen]


def no_groups(split: SplitConfig, key: str, what: str) -> None:
    if split.groups:
        raise ConfigError(f"config key {key}.groups={split.groups}: {what} has no groups")


def one_of(key: str, value: object, allowed: set[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(sorted(allowed))}")
