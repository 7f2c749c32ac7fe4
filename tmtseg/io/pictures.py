"""Label maps as pictures: a palette per class, colour label images and overlays on the input image."""

from __future__ import annotations

import numpy as np


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
