"""Prediction to pictures: colour label PNGs and overlays for an image or a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .models.inference import image_scores, window_scores

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def default_palette(num_classes: int) -> np.ndarray:
    """A distinct colour per class (the tab20 colours, then a fixed random draw)."""
    import matplotlib

    base = (np.array([matplotlib.colormaps["tab20"](i)[:3] for i in range(20)]) * 255).astype(np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, size=(max(0, num_classes - 20), 3), dtype=np.uint8)
    return np.concatenate([base, extra])[:num_classes]


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; a missing, unreadable or truncated file raises DataError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: unreadable image ({str(err).splitlines()[0]})") from None


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise DataError(f"{path}: no such file or folder")


def colorize(pred: np.ndarray, palette: np.ndarray, *, ignore_index: int | None = None) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] colours (ignore pixels black)."""
    out = palette[np.clip(pred, 0, len(palette) - 1)]
    if ignore_index is not None:
        out[pred == ignore_index] = 0
    return out


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + colours * alpha).astype(np.uint8)


@torch.no_grad()
def predict_array(model, image: np.ndarray, *, scale: float, mode: str, crop, stride, hooks=None) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] class ids at the image's own resolution (the model sees it resized by `scale`)."""
    device = next(model.parameters()).device
    score_fn = lambda x: image_scores(model, x.to(device), hooks).cpu()  # noqa: E731
    return predict_array_with(score_fn, image, scale=scale, mode=mode, crop=crop, stride=stride)


def predict_array_with(score_fn, image: np.ndarray, *, scale: float, mode: str, crop, stride) -> np.ndarray:
    """`predict_array` for any `score_fn` (uint8 [B, 3, h, w] -> scores [B, K, h, w]): a segmenter, its ONNX export."""
    x = rescale(torch.from_numpy(np.array(image)).permute(2, 0, 1), scale)  # [3, h, w] (a writable copy)
    logits = window_scores(score_fn, x[None], out_size=image.shape[:2], mode=mode, crop=crop, stride=stride)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def rescale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 [3, H, W] resized by `scale` as the model sees it (bilinear with antialias, rounded back to uint8)."""
    if scale == 1.0:
        return image
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
    return x.round().clamp(0, 255).to(torch.uint8)


def write_predictions(predict_fn, palette: np.ndarray, inputs: Path, out_dir: Path, *, progress=None) -> list[Path]:
    """Write `<stem>_pred.png` (colour labels) and `<stem>_overlay.png` for each image of `inputs`, with
    `predict_fn` ([H, W, 3] uint8 -> [H, W] class ids); return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    files = list_images(inputs)
    for path in progress(files) if progress else files:
        image = read_image(path)
        colours = colorize(predict_fn(image), palette)
        for suffix, arr in (("pred", colours), ("overlay", overlay(image, colours))):
            target = out_dir / f"{path.stem}_{suffix}.png"
            Image.fromarray(arr).save(target)
            written.append(target)
    return written


def predict_folder(trainer, cfg, meta: dict, inputs: Path, out_dir: Path, *, progress=None) -> list[Path]:
    """`write_predictions` with a checkpoint's trainer, as its config infers (scale, mode, crop, stride, hooks)."""
    palette = np.asarray(meta.get("palette") or default_palette(cfg.data.num_classes), dtype=np.uint8)
    trainer.eval()

    def predict_fn(image: np.ndarray) -> np.ndarray:
        return predict_array(
            trainer.model,
            image,
            scale=cfg.data.scale,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            hooks=trainer.method.inference_hooks(),
        )

    return write_predictions(predict_fn, palette, inputs, out_dir, progress=progress)
