"""Labels kept only inside chosen regions (`data.<split>.label_regions`): what a labeller who followed `tmtseg advise
--regions` would hand back, simulated from full labels. The ground truth stays where the region mask is 255 and is
the ignore index elsewhere; the loss already ignores void pixels, so a run trains on the chosen pixels only.

With `data.<split>.pseudo_labels` (the pseudo/ folder `advise --regions` writes), the pixels outside the chosen regions
take the model's own prediction instead of the ignore index (255 there stays ignored). Why: Mask2Former's loss is a
set loss; an image whose sky is left unlabelled has no sky segment to match, and the query that predicted sky is
trained toward "no object", so a model taught on uncertain regions alone unlearns the classes it was sure of
(docs/results.md, section 10). With the source model's confident prediction around them, those classes stay targets."""

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


def filled_labels(label: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """`label` [H, W] inside the chosen regions (mask > 0), `fill` [H, W] (the model's prediction, ignore where it
    has none) outside; mask and fill of any size, resized by nearest neighbour."""
    size = label.shape[::-1]
    if mask.shape != label.shape:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    if fill.shape != label.shape:
        fill = np.asarray(Image.fromarray(fill.astype(np.uint8)).resize(size, Image.NEAREST))
    return np.where(mask > 0, label, fill).astype(label.dtype)


def read_region_mask(masks_dir: str | Path, name: str, *, what: str = "region mask") -> np.ndarray:
    """The mask `advise --regions` wrote for the image `name` (a split's record name): masks_dir/<name>.png, [H, W]
    uint8 (also its pseudo-labels, `what`="pseudo-label"). A missing or unreadable file is a one-line DataError."""
    path = Path(masks_dir) / f"{name}.png"
    if not path.is_file():
        raise DataError(f"{path}: no {what} for image {name!r} (was the advice made for another pool?)")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable {what} ({str(err).splitlines()[0] or type(err).__name__})") from None


class RegionLabels:
    """A split's decoder followed by the region cut: the label kept where the record's mask is 255 (tested > 0, as
    `advise` writes 0 or 255), `ignore_index` elsewhere, or the pseudo-label of `fill_dir` there when it is given.
    The image is untouched: the model still sees all of it."""

    def __init__(
        self, decoder: Callable[[Record], Pair], masks_dir: Path, *, ignore_index: int, fill_dir: Path | None = None
    ) -> None:
        self.decoder, self.masks_dir, self.ignore_index, self.fill_dir = decoder, masks_dir, ignore_index, fill_dir

    def __call__(self, record: Record) -> Pair:
        rgb, label = self.decoder(record)
        mask = read_region_mask(self.masks_dir, record.name)
        if self.fill_dir is None:
            return rgb, partial_labels(label, mask, ignore_index=self.ignore_index)
        fill = read_region_mask(self.fill_dir, record.name, what="pseudo-label")
        return rgb, filled_labels(label, mask, fill)


def with_region_labels(decoder, masks_dir: str, *, ignore_index: int, key: str, pseudo: str = "") -> RegionLabels:
    """`decoder` cut to the regions of `masks_dir` (config key `key`.label_regions), filled outside them from the
    folder `pseudo` (`key`.pseudo_labels) if given; a folder that is not there is a ConfigError before any image is
    read."""
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"config key {key}.label_regions={masks_dir}: not a folder (the masks/ folder `tmtseg advise --regions`"
            " writes)"
        )
    if pseudo and not Path(pseudo).is_dir():
        raise ConfigError(
            f"config key {key}.pseudo_labels={pseudo}: not a folder (the pseudo/ folder `tmtseg advise --regions`"
            " writes)"
        )
    return RegionLabels(decoder, folder, ignore_index=ignore_index, fill_dir=Path(pseudo) if pseudo else None)
