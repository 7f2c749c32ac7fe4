"""`tmtseg advise`: which target images (or regions) to label, from a model's own view of them (docs/advise.md).

Every image of the pool is scored once, streamed: the mean semantic uncertainty U (normalised entropy of the class
probabilities, as TMA computes it), with ACTE the mean 1 - T and TMA's W, and one pooled ViT feature vector for the
diversity term; only these per-image numbers are kept. The choice itself is tmtseg/tools/advise_select.py's (plain
functions of the scores); the files are written by tmtseg/tools/advise_write.py.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tmtseg.adapt.align import RegionAlignment
from tmtseg.adapt.method import Hooks
from tmtseg.adapt.tma import TMA
from tmtseg.config import Config, SplitConfig, load_config
from tmtseg.data.folders import read_folder_yaml
from tmtseg.data.sources import list_source
from tmtseg.engine.step import amp_context
from tmtseg.errors import ConfigError, DataError
from tmtseg.io.pictures import output_names
from tmtseg.modeling.inference import eval_mode, input_scores, window_scores
from tmtseg.tools import advise_write as write
from tmtseg.tools.advise_select import (
    DEFAULT_STRATEGY,
    REGION_STRATEGIES,
    STRATEGIES,
    RegionTable,
    Scores,
    choose,
    choose_regions,
    grid_regions,
)
from tmtseg.tools.predict import (
    MAX_PIXELS,
    class_probabilities,
    image_pixels,
    inference_window,
    list_images,
    make_out_dir,
    read_image,
    refuse_inside,
    rescale,
)


@dataclass
class Pool:
    """The unlabelled target images: a name and a reader per image, in order; the split they come from (None for a
    plain folder of images, which no config reads until its images are labelled) and the folder outputs must avoid."""

    names: list[str]
    files: list[Path | None]
    read: list  # callables () -> [H, W, 3] uint8
    split: SplitConfig | None = None
    folder: Path | None = None
    scale: float = 1.0

    def __len__(self) -> int:
        return len(self.names)


def pool_of(target: Path, cfg: Config) -> Pool:
    """A folder of images, a folder dataset (dataset.yaml: its images/, labelled or not) or a config file (its
    data.train: the target split whose images would be labelled)."""
    if target.is_file() and target.suffix.lower() in (".yaml", ".yml"):
        data = load_config([str(target)]).data
        return split_pool(data.train, data, key="data.train")
    if target.is_dir() and (target / "dataset.yaml").is_file():
        read_folder_yaml(target / "dataset.yaml")  # a broken dataset.yaml is reported as the loaders report it
        split = SplitConfig(kind="folder", path=str(target.resolve()))
        return split_pool(split, replace(cfg.data, label_map={}), key="the folder")
    files = list_images(target)
    names = output_names(files)
    return Pool(
        [names[p] for p in files],
        list(files),
        [lambda p=p: read_image(p) for p in files],
        folder=target if target.is_dir() else None,
        scale=cfg.data.scale,
    )


def split_pool(split: SplitConfig, data, *, key: str) -> Pool:
    """The images of a split as a pool, in the loader's order (the advise bench's pool is a split)."""
    source = list_source(split, data, key=key, check_classes=False)
    if not source.records:
        raise ConfigError(f"config key {key}: selects no images from {source.where}")

    def reader(record):
        if record.image is not None:  # read as predict reads it (16-bit, float and odd-sized images)
            return lambda: read_image(record.image)
        return lambda: np.asarray(source.decoder(record)[0], dtype=np.uint8)  # synthetic scenes: rendered

    folder = Path(split.path) if split.kind in ("folder", "cityscapes") and split.path else None
    return Pool(
        [r.name for r in source.records],
        [r.image for r in source.records],
        [reader(r) for r in source.records],
        split=split,
        folder=folder,
        scale=split.scale or data.scale,
    )


@dataclass
class ImageScore:
    """One image's maps at its own resolution ([H, W] float32; t and w None without ACTE / TMA), its pooled ViT
    feature [C], where ACTE ran on the whole image at once its region ids [H, W], and the model's prediction [H, W]
    (uint8 class ids) with its probability [H, W] (the pseudo-labels of the region mode)."""

    u: np.ndarray
    t: np.ndarray | None
    w: np.ndarray | None
    feature: np.ndarray
    regions: np.ndarray | None = None
    pred: np.ndarray | None = None
    conf: np.ndarray | None = None


def _hooks(method):
    """The inference hooks, with ACTE run too where the method has it (TMA may be off at inference: T is then read
    without changing the prediction)."""
    hooks = method.inference_hooks()
    acte = [p for p in method.align if isinstance(p, RegionAlignment)]
    if acte and (hooks is None or not any(p in hooks.align for p in acte)):
        return Hooks(
            align=[*(hooks.align if hooks else []), *acte], attention=hooks.attention if hooks else [], grl=None
        )
    return hooks


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """[K, H, W] class probabilities -> normalised entropy [H, W] in [0, 1] (tmtseg/adapt/tma.py's U)."""
    k = probs.shape[0]
    if k == 1:
        return probs.new_zeros(probs.shape[1:])
    return (-torch.special.xlogy(probs, probs).sum(0) / math.log(k)).clamp(0.0, 1.0)


@torch.no_grad()
def score_image(trainer, image: np.ndarray, *, cfg: Config, scale: float, amp: str = "none") -> ImageScore:
    """Score one [H, W, 3] uint8 image as predict predicts it (data.scale, infer.mode, sliding windows above
    WHOLE_MAX_PIXELS); the windows' class scores and T are averaged as eval averages the scores."""
    model, method = trainer.model, trainer.method
    device = next(model.parameters()).device
    hooks = _hooks(method)
    x = rescale(torch.from_numpy(np.array(image)).permute(2, 0, 1), scale).to(device)[None]  # [1, 3, h, w]
    pixels = x.shape[-2] * x.shape[-1]
    if pixels > MAX_PIXELS:
        raise DataError(f"image of {pixels} pixels after data.scale={scale}: above {MAX_PIXELS}; cut it into tiles")
    how = inference_window(cfg.infer.mode, cfg.data.crop_size, cfg.infer.stride, pixels)
    pooled, acte_ids = [], []

    def score_fn(batch: torch.Tensor) -> torch.Tensor:
        out = model(batch, hooks=hooks)
        maps = [input_scores(out, batch).float()]  # [B, K, h, w]
        tmap = method.transferability(out.get("adapt", {}), tuple(out["pred_masks"].shape[-2:]))
        if tmap is not None:  # [B, 1, h/4, w/4] -> the input grid, as the class scores
            up = F.interpolate(tmap.float(), scale_factor=4.0, mode="bilinear", align_corners=False)
            maps.append(up[..., : batch.shape[-2], : batch.shape[-1]])
        pooled.append(out["features"]["tokens"].float().mean(1)[0])  # [C]
        if "acte" in out.get("adapt", {}):
            acte_ids.append(_acte_ids(method, out["adapt"]["acte"], batch.shape[-2:]))
        return torch.cat(maps, 1)

    with eval_mode(trainer), amp_context(amp, device):
        scores = window_scores(score_fn, x, out_size=image.shape[:2], mode=how[0], crop=how[1], stride=how[2])[0]
    k = cfg.data.num_classes
    probs = class_probabilities(scores[:k])  # [K, H, W]
    u = _entropy(probs)  # [H, W]
    conf, pred = probs.max(0)  # [H, W] each
    t = scores[k].clamp(0.0, 1.0) if scores.shape[0] > k else None
    tma = next((p for p in method.attention if isinstance(p, TMA)), None)
    w = tma.mix(1.0 - t, u) if t is not None and tma is not None else None
    regions = None
    if len(acte_ids) == 1:  # ACTE's regions of the whole image, brought to its resolution
        regions = F.interpolate(acte_ids[0][None, None].float(), size=image.shape[:2], mode="nearest")[0, 0]
    return ImageScore(
        u=u.cpu().numpy(),
        t=None if t is None else t.cpu().numpy(),
        w=None if w is None else w.cpu().numpy(),
        feature=torch.stack(pooled).mean(0).cpu().numpy(),
        regions=None if regions is None else regions.long().cpu().numpy(),
        pred=pred.to(torch.uint8).cpu().numpy(),
        conf=conf.float().cpu().numpy(),
    )


def _acte_ids(method, acte_out: dict, size) -> torch.Tensor:
    """ACTE's hard region ids [h, w] on the input grid of `size` (the feature grid covers the padded input)."""
    stride = next(p for p in method.align if isinstance(p, RegionAlignment)).feature_stride
    ids = acte_out["regions"].region_ids()[0]  # [gh, gw]
    up = ids.repeat_interleave(stride, 0).repeat_interleave(stride, 1)  # [gh * s, gw * s] >= the input
    return up[: size[0], : size[1]]


@dataclass
class Advice:
    """What `advise` decided and wrote: the scores table (one row per image, in pool order), the chosen image indices
    in order (image mode) or image index -> chosen region ids (region mode), and the files written."""

    names: list[str]
    scores: Scores
    strategy: str
    chosen: list[int] = field(default_factory=list)
    regions: dict[int, set[int]] | None = None
    files: list[Path] = field(default_factory=list)


def advise(
    trainer,
    cfg: Config,
    target: str | Path,
    out: str | Path,
    *,
    budget: int | None = None,
    regions: float | None = None,
    strategy: str | None = None,
    seed: int = 0,
    amp: str = "none",
    progress=None,
    note=None,
) -> Advice:
    """Score the pool `target` (see `pool_of`) with the model and write the advice to `out`: `budget` images by
    `strategy` (default: advise_select.DEFAULT_STRATEGY), or with `regions` the regions of highest score (default U)
    up to that % of the pool's pixels (one of the two). Everything `_refusals` lists is refused before any image is
    scored."""
    target, out = Path(target), Path(out)
    strategy = strategy or (DEFAULT_STRATEGY if regions is None else "u")
    pool = pool_of(target, cfg)
    _refusals(trainer, cfg, pool, target, out, budget=budget, regions=regions, strategy=strategy)
    if note is not None and not any(isinstance(p, RegionAlignment) for p in trainer.method.align):
        note(f"this checkpoint (adapt.method={cfg.adapt.method}) has no ACTE: U and diversity only, no 1 - T and W")
    make_out_dir(out, option="--out")
    if regions is not None:
        return _advise_regions(trainer, cfg, pool, out, regions, strategy, seed, amp, progress)
    scores = score_pool(trainer, cfg, pool, amp=amp, progress=progress)
    advice = Advice(pool.names, scores, strategy, choose(strategy, scores, budget, seed=seed))
    advice.files = write.image_advice(
        advice,
        pool,
        out,
        strategy=strategy,
        draw=lambda i: score_image(trainer, pool.read[i](), cfg=cfg, scale=pool.scale, amp=amp),
    )
    return advice


def _refusals(trainer, cfg, pool: Pool, target: Path, out: Path, *, budget, regions, strategy) -> None:
    """Not one budget and not one share, a strategy the mode or the checkpoint cannot follow (1 - T needs ACTE, W
    needs ACTE + TMA), a budget outside 1..pool size, an output folder inside the input folder, an image above
    MAX_PIXELS: each a one-line ConfigError or DataError (exit 2)."""
    if (budget is None) == (regions is None):
        raise ConfigError("advise: give --budget K (whole images) or --regions PCT (regions), one of the two")
    allowed = STRATEGIES if regions is None else REGION_STRATEGIES
    if strategy not in allowed:
        with_regions = " with --regions" if regions is not None else ""
        raise ConfigError(f"--strategy {strategy}{with_regions}: choose from {', '.join(allowed)}")
    has_t = any(isinstance(p, RegionAlignment) for p in trainer.method.align)
    has_w = has_t and any(isinstance(p, TMA) for p in trainer.method.attention)
    if (strategy == "1-t" and not has_t) or (strategy == "w" and not has_w):
        lacks = "ACTE" if strategy == "1-t" else "ACTE + TMA"
        raise ConfigError(
            f"--strategy {strategy}: a {cfg.adapt.method} checkpoint has no {lacks} to give it (a tmt one has); use"
            f" {', '.join(s for s in allowed if s not in ('1-t', 'w'))}"
        )
    if budget is not None and not 1 <= budget <= len(pool):
        raise ConfigError(f"--budget {budget}: the pool {target} holds {len(pool)} image(s); choose 1 to {len(pool)}")
    if pool.folder is not None:
        refuse_inside(out, pool.folder, option="--out")
    for path in pool.files:
        if path is not None and image_pixels(path, pool.scale) > MAX_PIXELS:
            raise DataError(f"{path}: above {MAX_PIXELS} pixels after data.scale={pool.scale}; cut it into tiles")


def score_pool(trainer, cfg, pool: Pool, *, amp: str, progress, each=None) -> Scores:
    """Score every image once, in order, keeping only its means and pooled feature (`each(i, score)` may look at
    its maps before they are dropped: the region mode's use)."""
    table = np.full((len(pool), 3), np.nan)  # [N, 3]: mean U, 1 - T, W; NaN where the map is absent
    features = None  # [N, C], allocated at the first image: numbers in arrays, not a Python object per image
    classes = np.zeros((len(pool), cfg.data.num_classes))  # [N, K]: the predicted share of each class
    for i in progress(range(len(pool))) if progress else range(len(pool)):
        s = score_image(trainer, pool.read[i](), cfg=cfg, scale=pool.scale, amp=amp)
        table[i] = (float(s.u.mean()), _mean(s.t, lambda t: 1.0 - t), _mean(s.w))
        classes[i] = class_shares(s.pred, cfg.data.num_classes)
        if features is None:
            features = np.empty((len(pool), *s.feature.shape), s.feature.dtype)
        features[i] = s.feature
        if each is not None:
            each(i, s)

    def column(j: int) -> np.ndarray | None:
        return None if np.isnan(table[:, j]).any() else table[:, j]

    return Scores(u=table[:, 0], one_minus_t=column(1), w=column(2), features=features, classes=classes)


def class_shares(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[K]: the share of a prediction's pixels ([H, W] class ids) given to each class."""
    counts = np.bincount(pred.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(pred.size, 1)


def _mean(x: np.ndarray | None, f=None) -> float:
    return float("nan") if x is None else float((f(x) if f else x).mean())


def quantise_prob(conf: np.ndarray) -> np.ndarray:
    """A probability map [H, W] in [0, 1] as uint8 (steps of 1/255): a region-mode pool's predictions wait on disk."""
    return np.round(np.clip(conf, 0.0, 1.0) * 255).astype(np.uint8)


def stored_prediction(z) -> tuple[np.ndarray, np.ndarray]:
    """(prediction [H, W] uint8, probability [H, W] float32) from an npz holding `pred` and a quantised `conf`."""
    return z["pred"], z["conf"].astype(np.float32) / 255.0


def region_cell(cfg: Config, scale: float) -> int:
    """The grid cell in image pixels: one ViT token (patch_size at the model's input, i.e. / data.scale here)."""
    return max(1, round(getattr(cfg.model.backbone, "patch_size", 16) / max(scale, 1e-6)))


def _advise_regions(trainer, cfg, pool: Pool, out: Path, percent, strategy, seed, amp, progress) -> Advice:
    """Region mode: each image's regions (ACTE's where it ran on the whole image, else a grid of token-sized cells)
    scored by the mean of the strategy's map; their ids wait on disk (never all in memory) until the choice."""
    table, tmp = RegionTable(), out / ".advise_regions"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def add(i: int, s: ImageScore) -> None:
        ids = s.regions if s.regions is not None else grid_regions(s.u.shape, region_cell(cfg, pool.scale))
        table.add(i, ids, {"1-t": None if s.t is None else 1.0 - s.t, "w": s.w}.get(strategy, s.u))
        np.savez(tmp / f"{i}.npz", ids=ids.astype(np.int32), pred=s.pred, conf=quantise_prob(s.conf))

    try:
        scores = score_pool(trainer, cfg, pool, amp=amp, progress=progress, each=add)
        scores.features = None  # the region choice has no diversity term
        advice = Advice(
            pool.names, scores, strategy, regions=choose_regions(table, percent, strategy=strategy, seed=seed)
        )
        advice.files = write.region_advice(
            advice, pool, out, ids_of=lambda i: np.load(tmp / f"{i}.npz")["ids"],
            pseudo_of=lambda i: stored_prediction(np.load(tmp / f"{i}.npz")),
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return advice
