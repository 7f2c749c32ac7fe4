"""The Python API: load a model (a run folder, a checkpoint folder or a .safetensors file), predict, evaluate, save it
with its model card, and adapt a source model to a target domain. The `tmtseg` command drives the same functions.

    >>> import tmtseg
    >>> model = tmtseg.load("runs/dusk/")                       # doctest: +SKIP
    >>> labels = model.predict("frame.png")                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from tmtseg import dist
from tmtseg.config import Config, SplitConfig, load_config, load_config_over
from tmtseg.data.decode import rgb_array
from tmtseg.engine.card import write_model_card
from tmtseg.engine.evaluate import evaluate_on_val
from tmtseg.engine.loop import fit
from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.engine.step import amp_context
from tmtseg.errors import ConfigError, DataError
from tmtseg.io.checkpoint import save_model_file
from tmtseg.modeling.inference import image_scores, window_scores
from tmtseg.tools.diagnose.models import resolve_checkpoint
from tmtseg.tools.predict import (
    MAX_PIXELS,
    class_probabilities,
    inference_window,
    list_images,
    read_image,
    rescale,
)

ImageLike = str | Path | np.ndarray | Image.Image
PRECISIONS = ("fp32", "bf16")


class SegmentationModel:
    """A trained segmenter with its config, classes and the method's inference hooks; always run in eval mode under
    torch.no_grad.

    >>> model = SegmentationModel.from_pretrained("runs/dusk/", device="cpu")   # doctest: +SKIP
    >>> model.predict("frame.png").shape                                       # doctest: +SKIP
    (360, 480)
    """

    def __init__(self, trainer, cfg: Config, meta: dict, *, path: Path, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
        self.trainer, self.cfg, self.meta, self.path, self.precision = trainer.eval(), cfg, meta, path, precision

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", precision: str = "fp32", overrides: list[str] = ()
    ) -> SegmentationModel:
        """Load a run folder (its checkpoints/best, else its newest iter_*), a checkpoint or save_pretrained folder,
        or a .safetensors file; `overrides` (``key=value``) change its config, e.g. ``infer.mode=slide``.

        >>> model = SegmentationModel.from_pretrained("runs/dusk/", precision="bf16")   # doctest: +SKIP
        """
        ckpt = resolve_checkpoint(path)
        trainer, cfg, meta = model_with_loss_from_checkpoint(ckpt, list(overrides))
        return cls(trainer, cfg, meta, path=ckpt, precision=precision).to(device)

    load = from_pretrained

    def to(self, device: str | torch.device) -> SegmentationModel:
        """Move the model to `device` ("cpu", "cuda", "cuda:1"); returns the model.

        >>> model = model.to("cuda")   # doctest: +SKIP
        """
        self.trainer.to(torch.device(device))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.trainer.model.parameters()).device

    @property
    def class_names(self) -> list[str]:
        """The class of each id of a prediction."""
        return list(self.meta.get("class_names") or self.cfg.data.class_names or range(self.cfg.data.num_classes))

    @property
    def palette(self) -> np.ndarray:
        """[K, 3] uint8 colours of the classes, as `tmtseg predict` paints them."""
        from tmtseg.io.pictures import default_palette

        return np.asarray(self.meta.get("palette") or default_palette(self.cfg.data.num_classes), dtype=np.uint8)

    @torch.no_grad()
    def predict(
        self, images: ImageLike | list[ImageLike], *, output: Literal["labels", "probs"] = "labels", batch_size: int = 4
    ) -> np.ndarray | list[np.ndarray]:
        """Predict at each image's own resolution: "labels" gives [H, W] int64 class ids, "probs" [K, H, W] float32
        class probabilities (the segmenter's class scores normalised over classes: their argmax is the label).

        `images`: a file, a [H, W, 3] uint8 array (or [H, W] grey), a PIL image -> one array; a list of these or a
        folder (its images in name order) -> a list. Images of one size go through the model `batch_size` at a time.

        >>> labels = model.predict("frame.png")                       # doctest: +SKIP
        >>> probs = model.predict(np.zeros((64, 64, 3), np.uint8), output="probs")   # doctest: +SKIP
        >>> many = model.predict("frames/")                           # doctest: +SKIP
        """
        if output not in ("labels", "probs"):
            raise ConfigError(f"output={output!r}: 'labels' or 'probs'")
        single = not isinstance(images, list) and not (isinstance(images, str | Path) and Path(images).is_dir())
        items = [images] if single else images if isinstance(images, list) else list_images(Path(images))
        arrays = [_as_rgb(x) for x in items]
        results: list[np.ndarray | None] = [None] * len(arrays)
        by_size: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            by_size.setdefault(a.shape, []).append(i)
        for idx in by_size.values():
            for start in range(0, len(idx), max(1, batch_size)):
                chunk = idx[start : start + max(1, batch_size)]
                for i, probs in zip(chunk, self._probs([arrays[i] for i in chunk]), strict=True):
                    results[i] = probs if output == "probs" else probs.argmax(0).astype(np.int64)
        return results[0] if single else results

    def _probs(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """[K, H, W] probabilities of same-size images, as `tmtseg predict` scores them (data.scale, infer.mode, the
        sliding window above WHOLE_MAX_PIXELS)."""
        cfg, device = self.cfg, self.device
        x = torch.stack([rescale(torch.from_numpy(np.array(a)).permute(2, 0, 1), cfg.data.scale) for a in arrays])
        pixels = x.shape[-2] * x.shape[-1]
        if pixels > MAX_PIXELS:
            raise DataError(f"image of {pixels} pixels after data.scale={cfg.data.scale}: above {MAX_PIXELS}")
        how = inference_window(cfg.infer.mode, cfg.data.crop_size, cfg.infer.stride, pixels)
        hooks = self.trainer.method.inference_hooks()

        def score_fn(batch: torch.Tensor) -> torch.Tensor:
            with amp_context("bf16" if self.precision == "bf16" else "none", device):
                return image_scores(self.trainer.model, batch.to(device), hooks).float()

        scores = window_scores(score_fn, x, out_size=arrays[0].shape[:2], mode=how[0], crop=how[1], stride=how[2])
        return list(class_probabilities(scores).cpu().numpy())  # [B, K, H, W] float32

    def advise(
        self,
        target: str | Path,
        out: str | Path,
        *,
        budget: int | None = None,
        regions: float | None = None,
        strategy: str | None = None,
        seed: int = 0,
        progress: bool = False,
        note=None,
    ):
        """Which target images to label (`budget` of them), or which regions (`regions` % of the pool's pixels), by
        the model's uncertainty U (and ACTE's 1 - T and TMA's W where it has them) and the images' diversity; writes
        advice.csv, chosen.txt, labelled.yaml and pictures to `out` (docs/advise.md). `target`: a folder of images, a
        folder dataset or a config file (its data.train). Returns the Advice (scores, chosen indices, files).

        >>> advice = model.advise("data/dusk/", "advice/", budget=20)        # doctest: +SKIP
        >>> [advice.names[i] for i in advice.chosen]                         # doctest: +SKIP
        """
        from tqdm import tqdm

        from tmtseg.tools.advise import advise

        amp = "bf16" if self.precision == "bf16" else "none"
        return advise(
            self.trainer,
            self.cfg,
            target,
            out,
            budget=budget,
            regions=regions,
            strategy=strategy,
            seed=seed,
            amp=amp,
            progress=(lambda items: tqdm(items, desc="scoring", unit="image")) if progress else None,
            note=note,
        )

    def evaluate(self, config: str | Path | None = None, *, overrides: list[str] = (), progress: bool = False) -> dict:
        """Score the model on data.val, the numbers `tmtseg eval` prints (mIoU, aAcc, per-class IoU, in percent):
        its own config's data.val, or the data section of `config` (a YAML file), plus ``key=value`` overrides.

        >>> scores = model.evaluate("configs/camvid_dusk.yaml")   # doctest: +SKIP
        >>> scores["mIoU"]                                          # doctest: +SKIP
        """
        cfg = self.cfg
        if config is not None:
            data = load_config([str(config)]).data
            if data.num_classes != cfg.data.num_classes:
                raise ConfigError(
                    f"{config}: data.num_classes={data.num_classes}, the model has {cfg.data.num_classes} classes"
                )
            cfg = dataclasses.replace(cfg, data=data)
        amp = ["train.amp=bf16"] if self.precision == "bf16" else []
        cfg = load_config_over(cfg, [*amp, *overrides])
        return evaluate_on_val(self.trainer, cfg, device=self.device, progress=progress)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `folder/model.safetensors` (weights; config, classes and scores in its metadata), `config.yaml` and
        the model card `README.md`; `tmtseg.load(folder)` and every `tmtseg` command that takes a checkpoint read it.

        >>> model.save_pretrained("out/")   # doctest: +SKIP
        >>> tmtseg.load("out/")             # doctest: +SKIP
        """
        from tmtseg.config import to_yaml

        folder = Path(folder)
        if folder.resolve() == Path(self.path).resolve():
            raise DataError(f"{folder}: is the checkpoint this model was loaded from; save to another folder")
        save_model_file(folder, model=self.trainer, meta=self.meta)
        (folder / "config.yaml").write_text(to_yaml(self.cfg))
        write_model_card(
            folder, self.cfg, self.meta, metrics=self.meta.get("metrics"), load_path=str(folder), checkpoint=str(folder)
        )
        return folder

    def __repr__(self) -> str:
        return f"SegmentationModel({str(self.path)!r}, method={self.cfg.adapt.method}, classes={len(self.class_names)})"


def _as_rgb(image: ImageLike) -> np.ndarray:
    """[H, W, 3] uint8 from a file, an array or a PIL image; anything else is a DataError naming what it got."""
    if isinstance(image, str | Path):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        return rgb_array(image, None)
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
            return rgb_array(Image.fromarray(image), None) if image.dtype != np.uint8 else _rgb3(image)
        raise DataError(f"an image array of shape {image.shape}: need [H, W, 3] RGB or [H, W] grey")
    raise DataError(f"an image of type {type(image).__name__}: need a path, a numpy array or a PIL image")


def _rgb3(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image)


def load(path: str | Path, **kwargs) -> SegmentationModel:
    """`SegmentationModel.from_pretrained`: a run folder, a checkpoint folder or a .safetensors file.

    >>> model = tmtseg.load("runs/dusk/", device="cpu")   # doctest: +SKIP
    """
    return SegmentationModel.from_pretrained(path, **kwargs)


def adapt_model(
    *,
    source: str | Path,
    target: str | Path,
    method: str = "recommended",
    labelled: int | None = None,
    output_dir: str | Path | None = None,
    overrides: list[str] = (),
    progress: bool = False,
) -> SegmentationModel:
    """Adapt a source model to a target domain as `tmtseg adapt` does; return the adapted model (its run folder is
    `model.path`'s, with the model card README.md).

    `source`: the source model (run folder or checkpoint); its config is the starting point and its training split
    the unlabelled source images. `target`: a config file (its data section: train, val) or a folder of images and
    masks (dataset.yaml): the first `labelled` images train, the rest validate. `method`: a method of `tmtseg adapt
    --method`, or "recommended" (the measured best).

    >>> run = tmtseg.adapt_model(source="runs/day/", target="data/dusk/", labelled=31)   # doctest: +SKIP
    """
    ckpt = resolve_checkpoint(source)
    _, src_cfg, _ = model_with_loss_from_checkpoint(ckpt)
    if Path(target).is_dir():
        if labelled is None:
            raise ConfigError(f"{target}: a folder target needs labelled=N (the first N images train, the rest score)")
        data = dataclasses.replace(
            src_cfg.data,
            train=SplitConfig(kind="folder", path=str(target), stop=labelled),
            val=SplitConfig(kind="folder", path=str(target), start=labelled),
        )
    else:
        data = load_config([str(target)]).data
        if labelled is not None:
            data = dataclasses.replace(data, train=dataclasses.replace(data.train, stop=data.train.start + labelled))
    data = dataclasses.replace(data, source=src_cfg.data.train)
    out = output_dir or Path("runs") / f"{Path(target).stem}-{method}"
    cfg = dataclasses.replace(src_cfg, data=data)
    cfg = load_config_over(
        cfg, [f"adapt.method={method}", f"adapt.source_checkpoint={ckpt}", f"output_dir={out}", *overrides]
    )
    fit(cfg, init_from=str(ckpt), progress=progress)
    return load(out, device=dist.local_device(cfg.train.device))
