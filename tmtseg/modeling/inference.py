"""Semantic inference of the mask transformer (docs/method.md §3): per-class scores from query classes and masks, on the
whole image or by overlapping sliding windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def semantic_probs(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Mask2Former's semantic scores: sum over queries of softmax(class)[:K] x sigmoid(mask) -> [B, K, h, w]."""
    cls = pred_logits.softmax(dim=-1)[..., :-1]  # [B, Q, K+1] -> [B, Q, K]
    return torch.einsum("bqk,bqhw->bkhw", cls, pred_masks.sigmoid())  # [B, K, h, w]


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of `crop` every `stride` that cover [0, size); the last one is flush with the end.

    A stride larger than the crop would leave stripes no window covers (their scores 0/0 = NaN, argmax class 0), so
    the step is at most the crop: every pixel is covered whatever the config says."""
    if size <= crop:
        return [0]
    step = max(1, min(stride, crop))
    n = math.ceil((size - crop) / step) + 1
    return sorted({min(i * step, size - crop) for i in range(n)})


def input_scores(out: dict, images: Tensor) -> Tensor:
    """Class scores [B, K, h, w] at the input resolution of the [B, 3, h, w] batch the segmenter output `out` is of
    (the stride-4 scores upsampled x4, then cropped)."""
    probs = semantic_probs(out["pred_logits"], out["pred_masks"])  # [B, K, h/4, w/4]
    probs = F.interpolate(probs, scale_factor=4.0, mode="bilinear", align_corners=False)  # [B, K, 4*ceil(h/4), ..]
    return probs[..., : images.shape[-2], : images.shape[-1]]  # [B, K, h, w]


def image_scores(model: nn.Module, images: Tensor, hooks) -> Tensor:
    """Class scores [B, K, h, w] at the input resolution of a [B, 3, h, w] batch."""
    return input_scores(model(images, hooks=hooks), images)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: Tensor,
    *,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: tuple[int, int] = (128, 128),
    stride: tuple[int, int] = (96, 96),
    hooks=None,
) -> Tensor:
    """Class scores [B, K, H, W] at `out_size` for a uint8 image [3, h, w] or batch [B, 3, h, w] in 0-255.

    mode "whole" runs the model once; "slide" averages the scores of overlapping `crop` windows every `stride`
    (windows are clipped to the image, so a window as large as the image equals "whole"). The model's train/eval mode
    is left as the caller set it.
    """
    images = image[None] if image.ndim == 3 else image  # [B, 3, h, w]
    images = images.to(next(model.parameters()).device)
    return window_scores(
        lambda x: image_scores(model, x, hooks), images, out_size=out_size, mode=mode, crop=crop, stride=stride
    )


def window_scores(
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    out_size: tuple[int, int],
    mode: str,
    crop: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """`predict_logits` for any `score_fn` ([B, 3, h, w] -> [B, K, h, w]: a segmenter, or its ONNX export) ->
    [B, K, H, W] at out_size."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"predict_logits: mode must be 'whole' or 'slide', not {mode!r}")
    H, W = images.shape[-2:]
    if mode == "whole":
        scores = score_fn(images)  # [B, K, h, w]
    else:
        ch, cw = min(crop[0], H), min(crop[1], W)
        scores, count = None, images.new_zeros((1, 1, H, W), dtype=torch.float32)
        for y in _window_starts(H, ch, stride[0]):
            for x in _window_starts(W, cw, stride[1]):
                window = score_fn(images[..., y : y + ch, x : x + cw])  # [B, K, ch, cw]
                if scores is None:
                    scores = window.new_zeros(window.shape[:2] + (H, W))  # [B, K, h, w]
                scores[..., y : y + ch, x : x + cw] += window
                count[..., y : y + ch, x : x + cw] += 1
        scores = scores / count
    if tuple(scores.shape[-2:]) != tuple(out_size):
        scores = F.interpolate(scores, size=tuple(out_size), mode="bilinear", align_corners=False)  # [B, K, H, W]
    return scores


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block (no dropout anywhere that takes part in inference: the segmenter,
    a method's discriminators), each put back in the mode the caller left it in afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
