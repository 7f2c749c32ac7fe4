"""Label maps as pictures: a palette per class, colour label images and overlays on the input image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tmtseg.errors import DataError


def default_palette(num_classes: int) -> np.ndarray:
    """A distinct colour per class (the tab20 colours, then a fixed random draw)."""
    import matplotlib

    base = (np.array([matplotlib.colormaps["tab20"](i)[:3] for i in range(20)]) * 255).astype(np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, size=(max(0, num_classes - 20), 3), dtype=np.uint8)
    return np.concatenate([base, extra])[:num_classes]


def colorize(pred: np.ndarray, palette: np.ndarray, *, ignore_index: int | None = None) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] colours (ignore pixels black)."""
    out = palette[np.clip(pred, 0, len(palette) - 1)]
    if ignore_index is not None:
        out[pred == ignore_index] = 0
    return out


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + colours * alpha).astype(np.uint8)


VOID = 255  # the id a palette or 16-bit id PNG gives void / ignore pixels (the Cityscapes and VOC convention)


def palette_png(ids: np.ndarray, palette: np.ndarray) -> Image.Image:
    """[H, W] class ids < 255 -> a "P" mode PNG: its pixel values are the ids, its palette the colours (255 black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(palette), VOID)] = palette[:VOID]
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    image.putpalette(table.reshape(-1).tolist())
    return image


def ids16_png(ids: np.ndarray) -> Image.Image:
    """[H, W] class ids -> a 16-bit greyscale PNG of the ids (for more than 255 classes)."""
    return Image.fromarray(ids.astype(np.uint16))


def binary_png(ids: np.ndarray) -> Image.Image:
    """[H, W] ids of a binary task -> an 8-bit mask with foreground 255, background 0, as image viewers show it."""
    return Image.fromarray((ids > 0).astype(np.uint8) * 255)


def read_ids(path) -> np.ndarray:
    """A palette, 8-bit or 16-bit greyscale id PNG -> [H, W] int64 ids; None for a colour (RGB) picture."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I;16B", "I"):
            return None
        return np.asarray(image).astype(np.int64)


def output_names(files: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: its stem, or its whole file name where stems clash (a.png and a.jpg)."""
    stems: dict[str, int] = {}
    for p in files:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    names = {p: p.stem if stems[p.stem] == 1 else p.name.replace(".", "_") for p in files}
    seen: dict[str, Path] = {}
    for p, name in names.items():
        if name in seen:  # e.g. "a_png.jpg" beside "a.png" and "a.jpg": no guess, say so
            raise DataError(f"{p}: its output name {name!r} clashes with that of {seen[name]}; rename one of them")
        seen[name] = p
    return names
