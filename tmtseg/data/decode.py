"""File decoding for every label format: one image/label pair -> uint8 [H, W, 3] image, int64 [H, W] label.

Each decoder maps its raw label values to class ids in [0, K) or ``ignore_index`` and raises one-line
:class:`DataError` messages naming the file; ``check_split`` reports exactly those messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from tmtseg.errors import DataError

# a decoded pair: image uint8 [H, W, 3], label int64 [H, W] in [0, K) or ignore_index
Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Record:
    """One item of a split: where its files are (synthetic scenes have none, only an index)."""

    name: str  # unique within the split; used to name saved predictions
    image: Path | None = None
    label: Path | None = None
    fov: Path | None = None  # DRIVE field-of-view mask
    domain: str = ""
    group: str = ""  # CamVid sequence, CHASE child id, Cityscapes city
    index: int = -1  # synthetic scene index


def open_image(path: Path | None, what: str, *, missing: str = "") -> Image.Image:
    """Open and fully decode a file; a missing, unreadable or truncated file is a DataError."""
    if path is None or not path.is_file():
        raise DataError(missing or f"{path}: missing {what}")
    if path.stat().st_size == 0:  # PIL would say "cannot identify image file <_io.BufferedReader name=...>"
        raise DataError(f"{path}: empty {what} file (0 bytes)")
    try:
        with path.open("rb") as f:  # our own handle: closed here, even for multi-frame formats such as GIF
            img = Image.open(f)
            img.load()  # PIL decodes lazily: truncation only shows here
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: unreadable or truncated {what} ({reason})") from None
    return img


def open_label(record: Record, *, hint: str = "") -> Image.Image:
    """The record's label image; a missing one is reported against the image it belongs to."""
    missing = f"{record.image}: missing mask {hint}".rstrip() if record.label is None else ""
    return open_image(record.label, "label", missing=missing)


def rgb_array(img: Image.Image, path: Path | None) -> np.ndarray:
    """uint8 [H, W, 3] from any image mode, rescaled from its real range: PIL's RGB conversion clips 16-bit values at
    255 (a 16-bit PNG comes out all but white) and float images to 0/1 (all black). 16-bit (and 32-bit integer images
    holding 16-bit values) map 0-65535 to 0-255; float images in [0, 1] or [0, 255] map to 0-255; anything else (a
    float outside both, NaN, integers above 16 bits) is refused, naming the file, rather than guessed."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return np.array(img.convert("RGB"))  # [H, W, 3], writable (torch.from_numpy warns about a read-only one)
    raw = np.asarray(img).astype(np.float64)  # [H, W]
    if not np.isfinite(raw).all():
        raise DataError(f"{path}: image holds NaN or inf values (mode {img.mode})")
    low, high = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    if img.mode == "F" and low >= 0 and high <= 1:
        grey = raw * 255
    elif img.mode == "F" and low >= 0 and high <= 255:
        grey = raw
    elif img.mode != "F" and low >= 0 and high <= 65535:
        grey = raw / 257  # 65535 -> 255 exactly
    else:
        raise DataError(
            f"{path}: {img.mode} image with values {low:g}..{high:g}: expected 16-bit integers, or floats in [0, 1] or"
            " [0, 255]; convert it to 8-bit"
        )
    return np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=2)  # [H, W, 3]


def read_rgb(path: Path | None) -> tuple[Image.Image, np.ndarray]:
    img = open_image(path, "image")
    return img, rgb_array(img, path)  # [H, W, 3]


def check_size(label_path: Path, label: Image.Image, image: Image.Image) -> None:
    """Label (or FOV mask) and image must have the same size: a mismatch is a DataError naming the label."""
    if label.size != image.size:
        (lw, lh), (iw, ih) = label.size, image.size
        raise DataError(f"{label_path}: label size {lw}x{lh} differs from image size {iw}x{ih}")


def indexed_values(img: Image.Image, path: Path, *, colour_hint: str = "") -> np.ndarray:
    """Raw values of an indexed (mode L or P) label; grey RGB is accepted, colour RGB is an error (+ colour_hint)."""
    if img.mode in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
        return np.asarray(img).astype(np.int64)
    if img.mode == "1":
        return np.asarray(img).astype(np.int64)
    if img.mode == "LA":
        return np.asarray(img)[..., 0].astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3]
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 0] != rgb[..., 2]).any():
            raise DataError(f"{path}: colour (RGB) label where an indexed (mode L or P) one is expected{colour_hint}")
        return rgb[..., 0].astype(np.int64)
    raise DataError(f"{path}: unsupported label image mode {img.mode}")


def make_lut(mapping: dict[int, int], *, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A lookup table raw value -> class id, and which raw values are allowed at all."""
    lut = np.zeros(size, dtype=np.int64)
    valid = np.zeros(size, dtype=bool)
    for raw, target in mapping.items():
        lut[raw] = target
        valid[raw] = True
    return lut, valid


def apply_lut(raw: np.ndarray, lut: np.ndarray, valid: np.ndarray, path: Path | None, *, hint: str = "") -> np.ndarray:
    """Map raw label values to class ids; any value the table does not allow is a DataError (+ ``hint``)."""
    if raw.size and (raw.min() < 0 or raw.max() >= len(valid)):
        raise DataError(f"{path}: label ids out of range: {int(raw.min())}..{int(raw.max())}{hint}")
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=len(valid)))
    bad = [int(v) for v in present if not valid[v]]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise DataError(f"{path}: label ids out of range: {shown} (neither a class id nor the ignore value){hint}")
    return lut[raw]  # [H, W]


def binary_label(img: Image.Image) -> np.ndarray:
    """JPEG/GIF masks: grey > 127 is foreground; the threshold settles JPEG ringing."""
    return (np.asarray(img.convert("L")) > 127).astype(np.int64)  # [H, W]


class IndexedDecoder:
    """Indexed PNG labels mapped by a lookup table (CamVid, Cityscapes, user folders)."""

    def __init__(self, *, mapping: dict[int, int], size: int = 256, missing_hint: str = "") -> None:
        self.lut, self.valid = make_lut(mapping, size=size)
        self.missing_hint = missing_hint

    def __call__(self, record: Record) -> Pair:
        image, rgb = read_rgb(record.image)
        label = open_label(record, hint=self.missing_hint)
        check_size(record.label, label, image)
        raw = indexed_values(label, record.label)
        return rgb, apply_lut(raw, self.lut, self.valid, record.label)


def camvid_decoder(*, ignore_index: int) -> IndexedDecoder:
    """CamVid (SegNet version): values 0-10 are the classes, 11 is void."""
    mapping = {v: v for v in range(11)}
    mapping[11] = ignore_index
    return IndexedDecoder(mapping=mapping)


class PolypDecoder:
    """Polyp masks: grey JPEG/PNG (CVC masks are RGB JPEG), > 127 = polyp."""

    def __call__(self, record: Record) -> Pair:
        image, rgb = read_rgb(record.image)
        mask = open_label(record)
        check_size(record.label, mask, image)
        return rgb, binary_label(mask)


def disc_fov(grey: np.ndarray, *, threshold: int = 20) -> np.ndarray:
    """CHASE_DB1 field of view: grey > threshold, cleaned into a filled disc. Some right-eye images are
    vignetted below the threshold at the top where vessels are annotated, so a circle fitted to the rim is added.
    """
    bright = grey > threshold
    labels, count = ndimage.label(bright)
    if count == 0:
        return bright
    sizes = ndimage.sum_labels(bright, labels, range(1, count + 1))
    main = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    rim = main & ~ndimage.binary_erosion(main, border_value=1)
    ys, xs = np.nonzero(rim)
    keep = np.ones(len(xs), dtype=bool)
    for _ in range(4):  # algebraic circle fit; vignetted rim points lie well inside the circle and are dropped
        x, y = xs[keep].astype(np.float64), ys[keep].astype(np.float64)
        coef = np.linalg.lstsq(np.stack([x, y, np.ones_like(x)], 1), x * x + y * y, rcond=None)[0]
        cx, cy = coef[0] / 2, coef[1] / 2
        radius = np.sqrt(max(coef[2] + cx * cx + cy * cy, 0.0))
        keep = np.hypot(xs - cx, ys - cy) - radius > -2.0
        if keep.sum() < 16:
            return main
    yy, xx = np.ogrid[: grey.shape[0], : grey.shape[1]]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (radius + 0.5) ** 2
    if disc.sum() > 1.3 * main.sum() or disc.sum() < 0.9 * main.sum():  # the fit went wrong: trust the threshold
        return main
    return main | disc


class RetinaDecoder:
    """DRIVE (FOV gif supplied) and CHASE_DB1 (3x enlarged JPEGs, FOV from the grey image)."""

    def __init__(self, *, ignore_index: int, chase_domain: str = "chase_db1", chase_factor: int = 3) -> None:
        self.ignore_index = ignore_index
        self.chase_domain = chase_domain
        self.chase_factor = chase_factor

    def __call__(self, record: Record) -> Pair:
        opened = open_image(record.image, "image")
        image = Image.fromarray(rgb_array(opened, record.image))  # RGB, rescaled from 16-bit or float
        mask = open_label(record)
        check_size(record.label, mask, image)
        if record.domain == self.chase_domain:
            # undo the distributor's bicubic 3x enlargement with an area filter: back to the original grid
            image = image.reduce(self.chase_factor)
            mask = mask.convert("L").reduce(self.chase_factor)
            fov = disc_fov(np.asarray(image.convert("L")))
        else:
            missing = f"{record.image}: no FOV mask in the manifest" if record.fov is None else ""
            fov_img = open_image(record.fov, "field-of-view mask", missing=missing)
            check_size(record.fov, fov_img, image)
            fov = np.asarray(fov_img.convert("L")) > 127
        label = binary_label(mask)
        label[~fov] = self.ignore_index
        return np.asarray(image), label


# Cityscapes label id -> train id (cityscapesScripts labels.py); every other id is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def cityscapes_decoder(*, ignore_index: int) -> IndexedDecoder:
    """gtFine labelIds -> the 19 train ids; every value is legal (unlisted ids are void)."""
    mapping = {v: CITYSCAPES_TRAIN_IDS.get(v, ignore_index) for v in range(256)}
    return IndexedDecoder(mapping=mapping)


def id_decoder(*, num_classes: int, raw_ignore: int, ignore_index: int) -> IndexedDecoder:
    """Labels that store class ids 0..K-1 directly, with one void value (IDD-Lite level-1 ids, BDD100K's palette
    indices = Cityscapes trainIds); any other value is a DataError naming the file."""
    mapping = {v: v for v in range(num_classes)}
    mapping[raw_ignore] = ignore_index
    return IndexedDecoder(mapping=mapping)
