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


def id_decoder(*, num_classes: int, raw_ignore: int, ignore_index: int) -> IndexedDecoder:
    """Labels that store class ids 0..K-1 directly, with one void value (IDD-Lite level-1 ids, BDD100K's palette
    indices = Cityscapes trainIds); any other value is a DataError naming the file."""
    mapping = {v: v for v in range(num_classes)}
    mapping[raw_ignore] = ignore_index
    return IndexedDecoder(mapping=mapping)
