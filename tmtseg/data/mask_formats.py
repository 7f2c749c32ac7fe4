"""How a user's masks are read: indexed ids (FolderDecoder), binary masks by a threshold on any format, RGB colour
masks by their nearest listed colour (tolerant of JPEG noise and the blends JPEG makes along edges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from tmtseg.data.decode import (
    IndexedDecoder,
    Pair,
    Record,
    apply_lut,
    check_size,
    indexed_values,
    open_label,
    read_rgb,
)
from tmtseg.errors import DataError

FOLDER_MISSING_HINT = "(no masks/<same stem>.<png|jpg|tif|bmp|gif>)"
# what a folder dataset's errors suggest, in dataset.yaml's own words
JPEG_HINT = (
    "; JPEG compression spreads mask values: set threshold: T (binary masks) or colors: (colour masks) in"
    " dataset.yaml, or save the masks as PNG"
)
COLOUR_HINT = "; for colour masks give each class its colour in dataset.yaml (colors: {class: [r, g, b]})"


class FolderDecoder(IndexedDecoder):
    """A user folder's indexed masks: :class:`IndexedDecoder` whose errors name the dataset.yaml fix, and which refuses
    masks holding only 0 and 255 when ``binary_guard`` (that message) is set: a two-class dataset with the default
    ignore value 255 would otherwise read every foreground pixel of a 0/255 mask as don't-care."""

    def __init__(self, *, mapping: dict[int, int], size: int = 256, binary_guard: str = "") -> None:
        super().__init__(mapping=mapping, size=size, missing_hint=FOLDER_MISSING_HINT)
        self.binary_guard = binary_guard

    def __call__(self, record: Record) -> Pair:
        image, rgb = read_rgb(record.image)
        label = open_label(record, hint=self.missing_hint)
        check_size(record.label, label, image)
        raw = indexed_values(label, record.label, colour_hint=COLOUR_HINT)
        if self.binary_guard and raw.size and raw.max() == 255 and not ((raw != 0) & (raw != 255)).any():
            raise DataError(self.binary_guard)
        hint = JPEG_HINT if label.format == "JPEG" else ""
        return rgb, apply_lut(raw, self.lut, self.valid, record.label, hint=hint)


def folder_decoder(
    *, num_classes: int, ignore_index: int, raw_ignore: int | None, id_map: dict[int, int], binary_guard: str = ""
) -> FolderDecoder:
    """A user folder: raw values map through id_map (or are class ids already); raw_ignore (if any) is void."""
    mapping = dict(id_map) if id_map else {v: v for v in range(num_classes)}
    if raw_ignore is not None:
        mapping[raw_ignore] = ignore_index
    size = max(256, max(mapping) + 1)
    return FolderDecoder(mapping=mapping, size=size, binary_guard=binary_guard)


def mask_intensity(img: Image.Image, path: Path) -> np.ndarray:
    """The brightness of a binary mask in any mode, for a threshold: grey and 16-bit values as stored, a 1-bit mask as
    0/255, colour (RGB, palette) as its brightest channel, so that a red or blue foreground on black counts as bright
    as a white one. [H, W]"""
    if img.mode in ("L", "I", "I;16", "I;16L", "I;16B", "F"):
        return np.asarray(img).astype(np.float64 if img.mode == "F" else np.int64)
    if img.mode == "1":
        return np.asarray(img).astype(np.int64) * 255
    if img.mode == "LA":
        return np.asarray(img)[..., 0].astype(np.int64)
    try:
        return np.asarray(img.convert("RGB")).max(axis=2).astype(np.int64)  # P, RGB, RGBA, CMYK, ...
    except ValueError:
        raise DataError(f"{path}: unsupported label image mode {img.mode}") from None


class ThresholdDecoder:
    """Binary masks in any format (dataset.yaml ``threshold: T``): brightness >= T is class 1, the rest class 0. JPEG
    noise around 0 and 255 is settled by any T in between."""

    def __init__(self, *, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, record: Record) -> Pair:
        image, rgb = read_rgb(record.image)
        mask = open_label(record, hint=FOLDER_MISSING_HINT)
        check_size(record.label, mask, image)
        return rgb, (mask_intensity(mask, record.label) >= self.threshold).astype(np.int64)  # [H, W]


def colour_values(img: Image.Image, path: Path) -> np.ndarray:
    """uint8 [H, W, 3] colours of a colour mask (RGB, RGBA, palette or grey); 16-bit and float masks are refused."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        raise DataError(f"{path}: {img.mode} mask where a colour (8-bit RGB) one is expected")
    return np.asarray(img.convert("RGB"))


def ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JPEG's full-range YCbCr of RGB colours. [..., 3] float"""
    r, g, b = (np.asarray(rgb, dtype=np.float64)[..., i] for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b, 128 + 0.5 * r - 0.418688 * g - 0.081312 * b], -1)


def blend_distance(colours: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """How far each colour is from every blend JPEG makes of two listed colours along an edge: chroma subsampling
    averages the chroma of neighbouring pixels and keeps each pixel's brightness, so a blend has a brightness between
    the two (Y in [Ya, Yb]) and a chroma on the segment between theirs. [U, 3], [M, 3] -> [U] (max of the Y and the
    chroma distance; inf with fewer than two listed colours)"""
    c, p = ycbcr(colours), ycbcr(listed)  # [U, 3], [M, 3]
    best = np.full(len(c), np.inf)
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            a, b = p[i], p[j]
            dy = np.maximum(0.0, np.maximum(min(a[0], b[0]) - c[:, 0], c[:, 0] - max(a[0], b[0])))
            ab = b[1:] - a[1:]
            t = np.clip((c[:, 1:] - a[1:]) @ ab / max(float(ab @ ab), 1e-9), 0.0, 1.0)  # [U]
            dc = np.linalg.norm(c[:, 1:] - (a[1:] + t[:, None] * ab), axis=1)
            best = np.minimum(best, np.maximum(dy, dc))
    return best


class ColourDecoder:
    """Colour masks (dataset.yaml ``colors: {class: [r, g, b]}``): each pixel takes the class of the listed colour
    nearest to it (largest channel difference). A colour farther than ``tolerance`` from every listed one is unknown:
    in a lossless mask any such pixel is an error naming the file and the colour. In a JPEG mask, whose chroma
    subsampling blends two colours along every edge (a thin object can lose its own colour altogether), such pixels
    take their nearest colour when they are blends of two listed colours or thin seams; a patch (wider than 3 x 3
    pixels) of a colour that is no such blend is the error."""

    def __init__(self, *, colours: np.ndarray, ids: np.ndarray, names: list[str], tolerance: int) -> None:
        self.colours = np.asarray(colours, dtype=np.int64)  # [M, 3]
        self.ids = np.asarray(ids, dtype=np.int64)  # [M]: class id or ignore_index of each colour
        self.names = list(names)  # [M]: the class (or "ignore") each colour stands for
        self.tolerance = tolerance

    def __call__(self, record: Record) -> Pair:
        image, rgb = read_rgb(record.image)
        mask = open_label(record, hint=FOLDER_MISSING_HINT)
        check_size(record.label, mask, image)
        return rgb, self.decode(colour_values(mask, record.label), record.label, lossy=mask.format == "JPEG")

    def decode(self, colours: np.ndarray, path: Path | None, *, lossy: bool) -> np.ndarray:
        """uint8 [H, W, 3] colours -> int64 [H, W] class ids (or ignore_index)."""
        c = colours.astype(np.int64)
        keys = (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]  # [H, W]
        uniq, inverse = np.unique(keys.ravel(), return_inverse=True)  # distinct colours: few, a few thousand in JPEG
        inverse = inverse.ravel()
        rgb = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=1)  # [U, 3]
        best = np.full(len(uniq), np.iinfo(np.int64).max)  # [U] distance to the nearest listed colour so far
        nearest = np.zeros(len(uniq), dtype=np.int64)  # [U]
        for m, colour in enumerate(self.colours):  # a loop over the listed colours: memory [U], not [U, M]
            d = np.abs(rgb - colour).max(axis=1)
            closer = d < best
            best[closer], nearest[closer] = d[closer], m
        unknown = best > self.tolerance  # [U]
        if unknown.any():
            counts = np.bincount(inverse, minlength=len(uniq))
            if not lossy:
                worst = int(np.argmax(np.where(unknown, counts, -1)))
                self._unknown(path, rgb[worst], int(counts[unknown].sum()), "")
            unknown[unknown] = blend_distance(rgb[unknown], self.colours) > self.tolerance
            off = unknown[inverse].reshape(keys.shape)  # [H, W]: neither near a listed colour nor a blend of two
            core = ndimage.binary_erosion(off, structure=np.ones((3, 3), dtype=bool))  # seams do not survive it
            if core.any():
                parts, _ = ndimage.label(off)
                patch = int(np.isin(parts, np.unique(parts[core])).sum())
                self._unknown(path, c[core].mean(axis=0).round().astype(int), patch, " (JPEG: a patch of about it)")
        return self.ids[nearest][inverse].reshape(keys.shape)

    def _unknown(self, path: Path | None, colour: np.ndarray, pixels: int, note: str) -> None:
        d = np.abs(self.colours - colour).max(axis=1)
        k = int(d.argmin())
        near = f"{self.names[k]!r} {self.colours[k].tolist()}"
        raise DataError(
            f"{path}: unknown colour {[int(v) for v in colour]} on {pixels} pixels{note}: none of the colors in"
            f" dataset.yaml is within color_tolerance={self.tolerance} (nearest: {near}, {int(d[k])} away); add it"
            " under colors"
        )
