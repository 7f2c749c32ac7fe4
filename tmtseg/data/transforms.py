"""Training and evaluation transforms on uint8 images and int64 labels (docs/method.md §3 training recipe).

All randomness comes from torch (the global RNG, or a given ``torch.Generator``) so that the
engine's ``torch.manual_seed`` and the DataLoader's per-worker seeds make runs reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], bilinear with antialiasing (downscaling must not alias)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    # uint8 input takes torch's fast integer path, which rounds and saturates by itself
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]  # [3, h, w]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """int64 [H, W] -> int64 [h, w]; nearest-exact samples pixel centres, aligned with the bilinear image."""
    if tuple(label.shape) == tuple(size):
        return label
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].long()  # [h, w]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled by a factor in [1 - strength, 1 + strength]."""
    img = image.float()
    img = img * _uniform(1 - strength, 1 + strength, generator)
    grey = img[0] * 0.299 + img[1] * 0.587 + img[2] * 0.114  # [H, W]
    img = (img - grey.mean()) * _uniform(1 - strength, 1 + strength, generator) + grey.mean()
    grey = img[0] * 0.299 + img[1] * 0.587 + img[2] * 0.114  # [H, W]
    img = (img - grey) * _uniform(1 - strength, 1 + strength, generator) + grey
    return img.round().clamp(0, 255).to(torch.uint8)


def train_transform(
    image: torch.Tensor,
    label: torch.Tensor,
    *,
    scale: float,
    scale_range: Sequence[float],
    crop_size: Sequence[int],
    hflip: bool,
    jitter: float,
    ignore_index: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W], int64 [H, W] -> a random crop: uint8 [3, Hc, Wc], int64 [Hc, Wc].

    Resize by ``scale``, rescale randomly in ``scale_range``, crop (padding the image with 0 and
    the label with ``ignore_index`` when smaller), flip, jitter colours.
    """
    h, w = scaled_size(*image.shape[-2:], scale)
    # one interpolation for the fixed and the random factor: less blur than two in a row
    h, w = scaled_size(h, w, _uniform(scale_range[0], scale_range[1], generator))
    image, label = resize_image(image, (h, w)), resize_label(label, (h, w))  # [3, h, w], [h, w]

    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    top = int(torch.randint(0, max(h - crop_h, 0) + 1, (), generator=generator))
    left = int(torch.randint(0, max(w - crop_w, 0) + 1, (), generator=generator))
    image = image[:, top : top + crop_h, left : left + crop_w]  # [3, <=Hc, <=Wc]
    label = label[top : top + crop_h, left : left + crop_w]

    if hflip and float(torch.rand((), generator=generator)) < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    if jitter > 0:
        image = color_jitter(image, jitter, generator)

    # pad after jitter so the padding stays exactly 0
    pad_h, pad_w = crop_h - image.shape[1], crop_w - image.shape[2]
    if pad_h > 0 or pad_w > 0:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)  # [3, Hc, Wc]
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)  # [Hc, Wc]
    return image.contiguous(), label.contiguous()


def eval_transform(image: torch.Tensor, label: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the image by ``scale``; the label keeps its full resolution (scores are taken there)."""
    return resize_image(image, scaled_size(*image.shape[-2:], scale)), label
