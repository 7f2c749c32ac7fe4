"""Prediction to files for an image or a folder of images: id PNGs (palette or 16-bit), colour PNGs, overlays, class
probabilities (.npy) and a JSON line of class areas per image, at the checkpoint's own precision."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tmtseg.data.decode import open_image, rgb_array
from tmtseg.data.transforms import resize_image, scaled_size
from tmtseg.engine.step import StopRequested, amp_context, precision_line
from tmtseg.errors import ConfigError, DataError, Preempted
from tmtseg.io.files import write_atomically
from tmtseg.io.pictures import (  # noqa: F401 (re-exported)
    VOID,
    binary_png,
    colorize,
    default_palette,
    ids16_png,
    output_names,
    overlay,
    palette_png,
)
from tmtseg.modeling.inference import eval_mode, image_scores, window_scores

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
def predict_array(
    model, image: np.ndarray, *, scale: float, mode: str, crop, stride, hooks=None, amp: str = "none"
) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] class ids at the image's own resolution (the model sees it resized by `scale`), under
    the checkpoint's precision `amp` (its train.amp: what `eval` and the in-training evaluation use)."""
    device = next(model.parameters()).device
    score_fn = lambda x: image_scores(model, x, hooks)  # noqa: E731
    with amp_context(amp, device):
        scores = predict_scores_with(score_fn, image, scale=scale, mode=mode, crop=crop, stride=stride, device=device)
    return ids_of(scores)


def predict_array_with(score_fn, image: np.ndarray, *, scale: float, mode: str, crop, stride) -> np.ndarray:
    """`predict_array` for any `score_fn` (uint8 [B, 3, h, w] -> scores [B, K, h, w]): a segmenter, its ONNX export."""
    return ids_of(predict_scores_with(score_fn, image, scale=scale, mode=mode, crop=crop, stride=stride))


def predict_scores_with(
    score_fn, image: np.ndarray, *, scale: float, mode: str, crop, stride, device=None
) -> torch.Tensor:
    """Class scores [K, H, W] at the image's own resolution on `device`, in the dtype `score_fn` computes them in
    (the windows are summed where eval sums them, so that an autocast around this call is eval's to the pixel)."""
    x = rescale(torch.from_numpy(np.array(image)).permute(2, 0, 1), scale).to(device or "cpu")  # [3, h, w]
    return window_scores(score_fn, x[None], out_size=image.shape[:2], mode=mode, crop=crop, stride=stride)[0]


def ids_of(scores: torch.Tensor) -> np.ndarray:
    """[K, H, W] scores -> [H, W] ids (uint8 up to 256 classes, uint16 above): the argmax `eval` scores."""
    ids = scores.argmax(0).cpu().numpy()
    return ids.astype(np.uint8 if scores.shape[0] <= 256 else np.uint16)


def rescale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 [3, H, W] resized by `scale` exactly as evaluation's transform resizes it (one function for both paths,
    so that predict and eval see the same pixels: a float resize rounded back differs from torch's uint8 path by 1)."""
    return resize_image(image, scaled_size(*image.shape[-2:], scale))


# Large inputs (pixels after data.scale): above WHOLE_MAX_PIXELS an image is predicted by sliding SLIDE_WINDOW windows
# (whole-image attention memory grows with the square of the pixel count); above MAX_PIXELS it is refused up front, as
# the class scores alone (K x H x W floats) would take gigabytes: set data.scale below 1 or cut the image into tiles.
WHOLE_MAX_PIXELS = 1024 * 1024
MAX_PIXELS = 4096 * 4096
SLIDE_WINDOW, SLIDE_STRIDE = (512, 512), (384, 384)


def inference_window(mode: str, crop, stride, pixels: int) -> tuple[str, tuple, tuple]:
    """(mode, crop, stride) an image of `pixels` (after data.scale) is predicted with: the config's, except sliding
    SLIDE_WINDOW windows for a whole-image mode above WHOLE_MAX_PIXELS."""
    if mode == "whole" and pixels > WHOLE_MAX_PIXELS:
        return "slide", SLIDE_WINDOW, SLIDE_STRIDE
    return mode, tuple(crop), tuple(stride)


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Class scores [..., K, H, W] normalised to sum 1 over the classes (dim -3): their argmax is the prediction."""
    scores = scores.float()
    return scores / scores.sum(-3, keepdim=True).clamp(min=1e-12)


def refuse_overwrite(targets: Iterable[Path], protected: list[Path], *, option: str) -> None:
    """An output that would replace an input file or a checkpoint is refused before anything is written."""
    inputs = {p.resolve(): p for p in protected}
    for target in targets:
        resolved = target.resolve()
        if resolved in inputs:
            raise DataError(f"{option} {target}: would overwrite the input {inputs[resolved]}; choose another output")
        if resolved.suffix == ".safetensors" or resolved.parent.name == "checkpoints":
            raise DataError(f"{option} {target}: a checkpoint's place (a .safetensors file or a run's checkpoints/)")


def refuse_inside(out_dir: Path, folder: Path, *, option: str) -> None:
    """An output folder equal to an input folder, or inside it, is refused: the next run over that folder would read
    the predictions as inputs (and an output name may clash with an input's)."""
    out, inp = out_dir.resolve(), folder.resolve()
    if out == inp or inp in out.parents:
        raise DataError(f"{option} {out_dir}: inside the input folder {folder}; choose an output folder outside it")


def make_out_dir(out_dir: Path, *, option: str) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{option} {out_dir}: cannot create the output folder ({err.strerror})") from None


def save_png(arr, target: Path, *, option: str = "--out") -> None:
    """An array or a PIL image -> a PNG at `target`, whole or not at all (written beside it, then renamed: a kill
    mid-write leaves no half PNG); a failure is a DataError naming it."""
    picture = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    try:
        write_atomically(target, lambda tmp: picture.save(tmp, format="PNG"))
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


FORMATS = ("palette", "ids16", "color", "npy")


def parse_formats(text: str) -> tuple[str, ...]:
    """`--format palette,npy` -> the formats, in order; unknown names, or both id PNGs at once, are refused."""
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not formats or any(f not in FORMATS for f in formats):
        raise ConfigError(f"--format {text}: choose from {', '.join(FORMATS)} (several comma-separated)")
    if {"palette", "ids16"} <= set(formats):
        raise ConfigError(f"--format {text}: palette and ids16 both write <name>.png; choose one")
    return formats


@dataclass(frozen=True)
class Outputs:
    """What predict writes for each image: `formats` (see FORMATS), the overlay, and with `jsonl` one line of class
    areas and mean confidence per image in predictions.jsonl; the class table they need."""

    palette: np.ndarray
    class_names: list[str]
    formats: tuple[str, ...] = ("palette",)
    binary: bool = False
    jsonl: bool = False

    def files(self, out_dir: Path, name: str) -> dict[str, Path]:
        suffix = {"palette": ".png", "ids16": ".png", "color": "_pred.png", "npy": ".npy"}
        return {**{f: out_dir / f"{name}{suffix[f]}" for f in self.formats}, "overlay": out_dir / f"{name}_overlay.png"}

    def check(self) -> None:
        if "palette" in self.formats and not self.binary and len(self.class_names) > VOID:
            raise ConfigError(f"--format palette: {len(self.class_names)} classes do not fit 8 bits; use ids16")


def _write_one(outputs: Outputs, files: dict[str, Path], image: np.ndarray, scores: torch.Tensor) -> np.ndarray:
    """Write one image's files (scores [K, H, W]) and return its ids."""
    ids = ids_of(scores)
    colours = colorize(ids, outputs.palette)
    for kind, target in files.items():
        if kind == "npy":  # the scores normalised to sum 1 per pixel: the argmax is the ids written beside them
            probs = class_probabilities(scores).numpy()
            try:
                write_atomically(target, lambda tmp, probs=probs: _save_npy(tmp, probs))
            except OSError as err:
                raise DataError(f"--out {target}: cannot write ({err.strerror or err})") from None
            continue
        if kind == "overlay":
            picture = overlay(image, colours)
        elif kind == "color":
            picture = colours
        elif outputs.binary:  # palette and ids16 alike: a 0/255 mask that any image viewer shows
            picture = binary_png(ids)
        else:
            picture = palette_png(ids, outputs.palette) if kind == "palette" else ids16_png(ids)
        save_png(picture, target)
    return ids


def _save_npy(target: Path, array: np.ndarray) -> None:
    with open(target, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def _stats_line(path: Path, name: str, ids: np.ndarray, scores: torch.Tensor, names: list[str]) -> str:
    """One image's JSON line: each predicted class's share of the pixels and the mean top-class confidence."""
    counts = np.bincount(ids.reshape(-1), minlength=len(names))
    probs = class_probabilities(scores).max(0).values
    areas = {names[k]: round(float(c) / ids.size, 6) for k, c in enumerate(counts) if c}
    record = {"image": str(path), "name": name, "size": list(ids.shape), "areas": areas}
    return json.dumps({**record, "mean_confidence": round(float(probs.mean()), 6)})


def write_predictions(
    score_fn,
    outputs: Outputs,
    inputs: Path,
    out_dir: Path,
    *,
    scale: float,
    mode: str,
    crop: tuple[int, int],
    stride: tuple[int, int],
    amp: str = "none",
    device=None,
    progress=None,
    protected=(),
    note=None,
) -> int:
    """Write `outputs`' files for each image, scored by `score_fn` (uint8 [B, 3, h, w] -> [B, K, h, w]: a segmenter
    or its ONNX export) as `predict_array_with` does, on `device` under `amp` autocast; return how many were written.

    Checked before anything is written: `out_dir` is not the input folder nor inside it, output names are distinct,
    none replaces an input (or a `protected` file such as the checkpoint), no image is above MAX_PIXELS. Images above
    WHOLE_MAX_PIXELS are predicted by sliding windows, each announced through `note(line)`.

    A SIGTERM stops the loop before its next image: Preempted (exit 143) says how many images were done; their
    files are whole (each is written beside its name and renamed), predictions.jsonl has one whole line for each.

    Memory stays bounded over any number of images (issue 29): one image is held at a time, its JSON line goes to
    predictions.jsonl as soon as it is predicted, and what is kept per image is its path and output name only (the
    targets and pixel counts are recomputed where needed, never listed).
    """
    outputs.check()
    files = list_images(inputs)
    if inputs.is_dir():
        refuse_inside(out_dir, inputs, option="--out")
    names = output_names(files)
    stats = out_dir / "predictions.jsonl"
    every = (t for p in files for t in outputs.files(out_dir, names[p]).values())
    refuse_overwrite(itertools.chain(every, [stats] if outputs.jsonl else []), [*files, *map(Path, protected)],
                     option="--out")  # fmt: skip
    for p in files:
        n = image_pixels(p, scale)
        if n > MAX_PIXELS:
            raise DataError(
                f"{p}: {n} pixels after data.scale={scale}, above the limit of {MAX_PIXELS} (4096x4096);"
                " set data.scale lower or cut the image into tiles"
            )
    make_out_dir(out_dir, option="--out")
    device = torch.device(device or "cpu")
    written = 0
    with StopRequested() as stop, _lines_to(stats if outputs.jsonl else None) as write_line:
        for done, path in enumerate(progress(files) if progress else files):
            if stop.flag:
                raise Preempted(f"SIGTERM during prediction: stopped after {done}/{len(files)} images (their files"
                                f" are whole); run the same command again")  # fmt: skip
            image = read_image(path)  # [H, W, 3]
            pixels = round(image.shape[0] * scale) * round(image.shape[1] * scale)  # as image_pixels reads it
            how = inference_window(mode, crop, stride, pixels)
            if how[0] != mode and note is not None:
                note(
                    f"{path}: {pixels} pixels, above {WHOLE_MAX_PIXELS}: predicted by sliding"
                    f" {SLIDE_WINDOW[0]}x{SLIDE_WINDOW[1]} windows"
                )
            with amp_context(amp, device):
                scores = predict_scores_with(
                    score_fn, image, scale=scale, mode=how[0], crop=how[1], stride=how[2], device=device
                ).cpu()
            targets = outputs.files(out_dir, names[path])
            ids = _write_one(outputs, targets, image, scores)
            written += len(targets)
            if outputs.jsonl:
                write_line(_stats_line(path, names[path], ids, scores, outputs.class_names))
    return written + int(outputs.jsonl)


@contextlib.contextmanager
def _lines_to(target: Path | None):
    """A function that writes one line to `target` (opened, and emptied, here); nothing is opened without a target."""
    if target is None:
        yield None
        return
    try:
        f = target.open("w")
    except OSError as err:
        raise DataError(f"--out {target}: cannot write ({err.strerror or err})") from None

    def write(line: str) -> None:
        try:
            f.write(line + "\n")
            f.flush()
        except OSError as err:
            raise DataError(f"--out {target}: cannot write ({err.strerror or err})") from None

    with f:
        yield write


def outputs_of(cfg, meta: dict, *, formats=("palette",), jsonl: bool = False) -> Outputs:
    """A checkpoint's class table (its dataset's names and palette) for `write_predictions`."""
    k = cfg.data.num_classes
    palette = np.asarray(meta.get("palette") or default_palette(k), dtype=np.uint8)
    names = list(meta.get("class_names") or [str(i) for i in range(k)])
    return Outputs(palette, names, tuple(formats), binary=cfg.data.binary, jsonl=jsonl)


def precision_of(cfg, precision: str = "checkpoint") -> tuple[str, str]:
    """(autocast of the run, the line predict prints) for `--precision`: "checkpoint" is its train.amp (eval's
    precision: the same ids to the pixel), fp32 and bf16 say it, int8 is the ViT's linear layers in int8
    (tmtseg/modeling/quantize.py) with the rest in float32."""
    if precision == "checkpoint":
        return cfg.train.amp, precision_line(cfg.train.amp)
    if precision == "int8":
        return "none", "inference precision: int8 ViT linear layers (dynamic, per-channel weights), the rest float32"
    amp = {"fp32": "none", "bf16": "bf16"}[precision]
    return amp, f"inference precision: {'bfloat16 autocast' if amp == 'bf16' else 'float32'} (--precision {precision})"


@torch.no_grad()
def predict_folder(
    trainer,
    cfg,
    meta: dict,
    inputs: Path,
    out_dir: Path,
    *,
    outputs=None,
    progress=None,
    protected=(),
    note=None,
    precision: str = "checkpoint",
) -> int:
    """`write_predictions` with a checkpoint's trainer, as its config infers (scale, mode, crop, stride, hooks) and
    at `precision` (`precision_of`; by default train.amp, as `eval` and the in-training evaluation: the same ids to
    the pixel). int8 runs a quantised copy of the segmenter; the trainer is untouched."""
    device = next(trainer.model.parameters()).device
    amp, _ = precision_of(cfg, precision)
    model = trainer.model
    if precision == "int8":
        from tmtseg.modeling.quantize import int8_copy

        model = int8_copy(trainer.model)

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        return image_scores(model, x, trainer.method.inference_hooks())

    with eval_mode(trainer):
        return write_predictions(
            score_fn,
            outputs or outputs_of(cfg, meta),
            inputs,
            out_dir,
            scale=cfg.data.scale,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            amp=amp,
            device=device,
            progress=progress,
            protected=protected,
            note=note,
        )
