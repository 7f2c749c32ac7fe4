"""Labels kept only inside chosen regions (`data.<split>.label_regions`): what a labeller who followed `tmtseg advise
--regions` would hand back, simulated from full labels. The ground truth stays where the region mask is 255 and is
the ignore index elsewhere; the loss already ignores void pixels, so a run trains on the chosen pixels only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tmtseg.data.decode import Pair, Record
from tmtseg.errors import ConfigError, DataError


def partial_labels(label: np.ndarray, mask: np.ndarray, *, ignore_index: int = 255) -> np.ndarray:
    """A full label [H, W] cut to the chosen regions: `ignore_index` wherever the advice mask ([H, W], 255 = chosen;
    any size, resized by nearest neighbour) is 0. What a labeller who followed the advice would hand back."""
    if mask.shape != label.shape:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(label.shape[::-1], Image.NEAREST))
    return np.where(mask > 0, label, ignore_index).astype(label.dtype)


def read_region_mask(masks_dir: str | Path, name: str) -> np.ndarray:
    """The mask `advise --regions` wrote for the image `name` (a split's record name): masks_dir/<name>.png, [H, W]
    uint8. A missing or unreadable mask is a one-line DataError."""
    path = Path(masks_dir) / f"{name}.png"
    if not path.is_file():
        raise DataError(f"{path}: no region mask for image {name!r} (was the advice made for another pool?)")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable region mask ({str(err).splitlines()[0] or type(err).__name__})") from None


class RegionLabels:
    """A split's decoder followed by the region cut: the label kept where the record's mask is 255 (tested > 0, as
    `advise` writes 0 or 255), `ignore_index` elsewhere. The image is untouched: the model still sees all of it."""

    def __init__(self, decoder: Callable[[Record], Pair], masks_dir: Path, *, ignore_index: int) -> None:
        self.decoder, self.masks_dir, self.ignore_index = decoder, masks_dir, ignore_index

    def __call__(self, record: Record) -> Pair:
        rgb, label = self.decoder(record)
        mask = read_region_mask(self.masks_dir, record.name)
        return rgb, partial_labels(label, mask, ignore_index=self.ignore_index)


def with_region_labels(decoder, masks_dir: str, *, ignore_index: int, key: str) -> RegionLabels:
    """`decoder` cut to the regions of `masks_dir` (config key `key`.label_regions); a folder that is not there is a
    ConfigError before any image is read."""
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"config key {key}.label_regions={masks_dir}: not a folder (the masks/ folder `tmtseg advise --regions`"
            " writes)"
        )
    return RegionLabels(decoder, folder, ignore_index=ignore_index)
