"""Prediction to pictures: colour label PNGs and overlays for an image or a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tmtseg.data.decode import open_image, rgb_array
from tmtseg.errors import DataError
from tmtseg.io.pictures import colorize, default_palette, overlay  # noqa: F401 (re-exported)
from tmtseg.modeling.inference import image_scores, window_scores

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] (16-bit and float images rescaled from their real range); a missing, unreadable or
    truncated file raises DataError naming it."""
    return rgb_array(open_image(path, "image", missing=f"{path}: file not found"), path)


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise DataError(f"{path}: no such file or folder")


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


# Large inputs (pixels after data.scale): above WHOLE_MAX_PIXELS an image is predicted by sliding SLIDE_WINDOW windows
# (whole-image attention memory grows with the square of the pixel count); above MAX_PIXELS it is refused up front, as
# the class scores alone (K x H x W floats) would take gigabytes: set data.scale below 1 or cut the image into tiles.
WHOLE_MAX_PIXELS = 1024 * 1024
MAX_PIXELS = 4096 * 4096
SLIDE_WINDOW, SLIDE_STRIDE = (512, 512), (384, 384)


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


def refuse_overwrite(targets: list[Path], protected: list[Path], *, option: str) -> None:
    """An output that would replace an input file or a checkpoint is refused before anything is written."""
    inputs = {p.resolve(): p for p in protected}
    for target in targets:
        resolved = target.resolve()
        if resolved in inputs:
            raise DataError(f"{option} {target}: would overwrite the input {inputs[resolved]}; choose another output")
        if resolved.suffix == ".safetensors" or resolved.parent.name == "checkpoints":
            raise DataError(f"{option} {target}: a checkpoint's place (a .safetensors file or a run's checkpoints/)")


def make_out_dir(out_dir: Path, *, option: str) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{option} {out_dir}: cannot create the output folder ({err.strerror})") from None


def save_png(arr: np.ndarray, target: Path, *, option: str) -> None:
    try:
        Image.fromarray(arr).save(target)
    except OSError as err:
        raise DataError(f"{option} {target}: cannot write ({err.strerror or err})") from None


def image_pixels(path: Path, scale: float) -> int:
    """The pixel count the model would see (header only; an unreadable file counts 0 and fails when read)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # reported, naming the file, by read_image
        return 0
    return round(h * scale) * round(w * scale)


def write_predictions(
    score_fn,
    palette: np.ndarray,
    inputs: Path,
    out_dir: Path,
    *,
    scale: float,
    mode: str,
    crop: tuple[int, int],
    stride: tuple[int, int],
    progress=None,
    protected=(),
    note=None,
) -> list[Path]:
    """Write `<stem>_pred.png` (colour labels) and `<stem>_overlay.png` for each image, scored by `score_fn` (uint8
    [B, 3, h, w] -> [B, K, h, w]: a segmenter or its ONNX export) as `predict_array_with` does; return the paths.

    Checked before anything is written: output names are distinct, none replaces an input (or a `protected` file such
    as the checkpoint), no image is above MAX_PIXELS. Images above WHOLE_MAX_PIXELS are predicted by sliding windows,
    each announced through `note(line)`.
    """
    files = list_images(inputs)
    names = output_names(files)
    targets = {p: [out_dir / f"{names[p]}_{suffix}.png" for suffix in ("pred", "overlay")] for p in files}
    refuse_overwrite([t for ts in targets.values() for t in ts], [*files, *map(Path, protected)], option="--out")
    pixels = {p: image_pixels(p, scale) for p in files}
    for p, n in pixels.items():
        if n > MAX_PIXELS:
            raise DataError(
                f"{p}: {n} pixels after data.scale={scale}, above the limit of {MAX_PIXELS} (4096x4096);"
                " set data.scale lower or cut the image into tiles"
            )
    make_out_dir(out_dir, option="--out")
    written = []
    for path in progress(files) if progress else files:
        image = read_image(path)
        how = (mode, crop, stride)
        if mode == "whole" and pixels[path] > WHOLE_MAX_PIXELS:
            how = ("slide", SLIDE_WINDOW, SLIDE_STRIDE)
            if note is not None:
                note(
                    f"{path}: {pixels[path]} pixels, above {WHOLE_MAX_PIXELS}: predicted by sliding"
                    f" {SLIDE_WINDOW[0]}x{SLIDE_WINDOW[1]} windows"
                )
        pred = predict_array_with(score_fn, image, scale=scale, mode=how[0], crop=how[1], stride=how[2])
        colours = colorize(pred, palette)
        for target, arr in zip(targets[path], (colours, overlay(image, colours)), strict=True):
            save_png(arr, target, option="--out")
            written.append(target)
    return written


@torch.no_grad()
def predict_folder(
    trainer, cfg, meta: dict, inputs: Path, out_dir: Path, *, progress=None, protected=(), note=None
) -> list[Path]:
    """`write_predictions` with a checkpoint's trainer, as its config infers (scale, mode, crop, stride, hooks)."""
    palette = np.asarray(meta.get("palette") or default_palette(cfg.data.num_classes), dtype=np.uint8)
    trainer.eval()
    device = next(trainer.model.parameters()).device

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        return image_scores(trainer.model, x.to(device), trainer.method.inference_hooks()).cpu()

    return write_predictions(
        score_fn,
        palette,
        inputs,
        out_dir,
        scale=cfg.data.scale,
        mode=cfg.infer.mode,
        crop=tuple(cfg.data.crop_size),
        stride=tuple(cfg.infer.stride),
        progress=progress,
        protected=protected,
        note=note,
    )
