"""Prediction to pictures: colour label PNGs and overlays for an image or a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .models.inference import predict_logits

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
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] (a writable copy)
    h, w = x.shape[-2:]
    if scale != 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear", antialias=True)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
    logits = predict_logits(model, x.to(device), out_size=(h, w), mode=mode, crop=crop, stride=stride, hooks=hooks)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def predict_folder(trainer, cfg, meta: dict, inputs: Path, out_dir: Path, *, progress=None) -> list[Path]:
    """Write `<stem>_pred.png` (colour labels) and `<stem>_overlay.png` for each image; return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = np.asarray(meta.get("palette") or default_palette(cfg.data.num_classes), dtype=np.uint8)
    trainer.eval()
    written = []
    files = list_images(inputs)
    for path in progress(files) if progress else files:
        image = read_image(path)
        pred = predict_array(
            trainer.model,
            image,
            scale=cfg.data.scale,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            hooks=trainer.method.inference_hooks(),
        )
        colours = colorize(pred, palette)
        for suffix, arr in (("pred", colours), ("overlay", overlay(image, colours))):
            target = out_dir / f"{path.stem}_{suffix}.png"
            Image.fromarray(arr).save(target)
            written.append(target)
    return written
