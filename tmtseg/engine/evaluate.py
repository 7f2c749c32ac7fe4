"""Evaluation: a model scored on a labelled dataset as the config infers (whole image or sliding windows, the
method's inference hooks, the config's precision), and a checkpoint scored on its config's data.val."""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tmtseg import dist
from tmtseg.adapt.build import ModelWithLoss
from tmtseg.config import Config
from tmtseg.data import build_dataset, data_report
from tmtseg.engine.compiled import compile_model
from tmtseg.engine.inputs import changed_inputs, refuse_changed, split_input
from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.engine.step import StopRequested, amp_context
from tmtseg.errors import DataError, Preempted
from tmtseg.metrics import SegMetrics
from tmtseg.modeling.feature_cache import FeatureCache
from tmtseg.modeling.inference import eval_mode, predict_logits


def check_data(cfg: Config, splits: tuple[str, ...]) -> None:
    """Print what the model will learn from (each class's share per split, any void warning) and refuse to start on
    bad data: the first problem of `tmtseg data check`, naming the file."""
    report = data_report(cfg, splits=splits)
    if dist.is_main():
        if multiprocessing.parent_process() is None:  # not in a bench's worker: its output is the bench's progress
            print(report.table(), flush=True)
        for line in report.warnings:
            warnings.warn(line, stacklevel=2)
    problems = report.problems
    if problems:
        more = f" (and {len(problems) - 1} more; run `tmtseg data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    mode: str,
    crop: tuple[int, int],
    stride: tuple[int, int],
    device: torch.device,
    binary: bool,
    hooks_fn: Callable[[], object] | None = None,
    progress: bool = False,
    amp: str = "none",
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Score a labelled dataset at label resolution, under bf16 autocast if amp is "bf16"; shards over processes and
    all-reduces the confusion matrix. `model` is put in eval mode for the call; the modules behind `hooks_fn` (a
    method's pieces) are the caller's to put there (`evaluate_model_with_loss` does).

    `stop` (SIGTERM seen, for `tmtseg eval`) is asked before each image and after the last: when it holds, Preempted
    says how far the scoring got and no metric is returned, so that no partial score can be written. The evaluation
    inside training passes none: there a SIGTERM lets the evaluation finish, then the loop saves and stops."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(
        num_classes=dataset.num_classes,
        ignore_index=dataset.ignore_index,
        class_names=dataset.class_names,
        binary=binary,
    )
    try:
        world = dist.world_size()
        indices = range(dist.rank(), len(dataset), world)
        for done, i in enumerate(tqdm(indices, desc="eval", disable=not (progress and dist.is_main()), leave=False)):
            _check_stop(stop, done, len(indices))
            item = dataset[i]
            label = item["label"]
            with amp_context(amp, device):
                logits = predict_logits(
                    model,
                    item["image"].to(device),
                    out_size=tuple(label.shape[-2:]),
                    mode=mode,
                    crop=crop,
                    stride=stride,
                    hooks=hooks_fn() if hooks_fn else None,
                )  # [1, K, H, W]
            metrics.update(logits.argmax(1)[0].cpu(), label)
        _check_stop(stop, len(indices), len(indices))
        if dist.is_distributed():
            metrics.confusion = dist.all_reduce_sum(metrics.confusion)
            # rank r scored images r, r + W, ...: interleave the per-image scores back into dataset order
            shards = dist.all_gather_lists(metrics.image_dice)
            metrics.image_dice = [shards[i % world][i // world] for i in range(sum(len(x) for x in shards))]
    finally:
        model.train(was_training)
    return metrics.compute()


def _check_stop(stop: Callable[[], bool] | None, done: int, total: int) -> None:
    if stop is not None and stop():
        raise Preempted(f"stopped after {done}/{total} images")


def evaluate_checkpoint(
    path: str, *, overrides: list[str] | None = None, progress: bool = True, allow_changed_inputs: bool = False
) -> tuple[dict, Config]:
    """Score a checkpoint on its config's data.val (overrides may point it at another split or data root). The split
    the run recorded (data.val, same split config) must still hold the same files (their hash), unless
    `allow_changed_inputs`: then the metrics carry the change (`changed_inputs`).

    A SIGTERM from here on (loading included) stops the scoring before its next image: Preempted (exit 143) names the
    checkpoint and how far it got, and nothing is returned to write (`tmtseg eval`, a bench's evaluation run)."""
    with StopRequested() as stop:
        model_with_loss, cfg, meta = model_with_loss_from_checkpoint(path, overrides)
        recorded = meta.get("inputs") or {}
        changes = changed_inputs(recorded, {"data.val": split_input(cfg, "val")}) if "data.val" in recorded else []
        refuse_changed(changes, where=f"{path} was trained", allow=allow_changed_inputs)
        try:
            metrics = evaluate_on_val(model_with_loss, cfg, progress=progress, stop=lambda: stop.flag)
        except Preempted as err:
            raise Preempted(f"SIGTERM during evaluation of {path}: {err}; nothing written; run it again") from None
    return ({**metrics, "changed_inputs": changes} if changes else metrics), cfg


def evaluate_on_val(
    model_with_loss: ModelWithLoss, cfg: Config, *, device=None, progress: bool = True, stop=None
) -> dict:
    """Score a loaded model on `cfg`'s data.val as `tmtseg eval` does: the data checked first, on `device` (default:
    train.device), compiled if train.compile."""
    check_data(cfg, ("val",))
    device = device or dist.local_device(cfg.train.device)
    model_with_loss.to(device)
    if cfg.train.compile:
        compile_model(model_with_loss.model, backend=cfg.train.compile_backend)
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    return evaluate_model_with_loss(model_with_loss, cfg, val_ds, device, progress=progress, stop=stop)


def evaluate_model_with_loss(
    model_with_loss: ModelWithLoss, cfg: Config, dataset, device, *, progress: bool, stop=None
) -> dict:
    """Score the segmenter on `dataset` as `cfg` infers (mode, crop, stride; the method's inference hooks; the ViT's
    outputs from infer.feature_cache if set). Every module takes part in eval mode (a method's discriminators whose T
    biases attention would otherwise add dropout noise), whatever mode the caller left them in; their modes are put
    back afterwards."""
    backbone = model_with_loss.model.backbone
    if cfg.infer.feature_cache and getattr(backbone, "feature_cache", False) is None:
        backbone.feature_cache = FeatureCache(cfg.infer.feature_cache)
    with eval_mode(model_with_loss):
        return evaluate(
            model_with_loss.model,
            dataset,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            device=device,
            binary=cfg.data.binary,
            hooks_fn=model_with_loss.method.inference_hooks,
            progress=progress,
            amp=cfg.train.amp,
            stop=stop,
        )


# files `tmtseg predict` writes beside the ids: not predictions to score, not extra files either
_BESIDE = ("_overlay.png", "_pred.png")


def evaluate_predictions(cfg: Config, folder: Path) -> dict:
    """Score a folder of id PNGs (palette, 8- or 16-bit; another tool's or `tmtseg predict`'s) against cfg.data.val's
    labels with the metric `eval` uses. Each label's prediction is `<image name>.png` as predict names it (or the
    label's stem); a missing, extra, colour, wrongly sized or out-of-range file is refused by name."""
    from tmtseg.io.pictures import output_names, read_ids

    if not folder.is_dir():
        raise DataError(f"--predictions {folder}: no such folder")
    ds = build_dataset(cfg.data.val, cfg.data, train=False)
    names = output_names([r.image for r in ds.records])
    pngs = {p.name: p for p in folder.iterdir() if p.suffix == ".png" and not p.name.endswith(_BESIDE)}
    metrics = SegMetrics(
        num_classes=ds.num_classes, ignore_index=ds.ignore_index, class_names=ds.class_names, binary=cfg.data.binary
    )
    used = set()
    for index, record in enumerate(ds.records):
        wanted = [f"{names[record.image]}.png", f"{Path(record.label).stem}.png" if record.label else ""]
        found = next((pngs[w] for w in wanted if w in pngs), None)
        if found is None:
            raise DataError(f"{folder / wanted[0]}: missing, the prediction for {record.label or record.image}")
        used.add(found.name)
        label = ds.load(index)[1]
        metrics.update(torch.from_numpy(_prediction_ids(found, read_ids, label.shape, ds.num_classes, cfg)), label)
    extra = sorted(set(pngs) - used)
    if extra:
        raise DataError(f"{folder / extra[0]}: no label in data.val matches it (and {len(extra) - 1} more extra files)")
    return metrics.compute()


def _prediction_ids(path: Path, read_ids, shape, num_classes: int, cfg: Config):
    """One prediction file -> [H, W] ids, checked against its label's size and the class count."""
    ids = read_ids(path)
    if ids is None:
        raise DataError(f"{path}: a colour picture, not class ids; write it with predict --format palette or ids16")
    if tuple(ids.shape) != tuple(shape):
        raise DataError(f"{path}: {ids.shape[1]}x{ids.shape[0]} px, its label is {shape[1]}x{shape[0]}")
    if cfg.data.binary:  # 0/255 masks (and 0/1 ids): foreground is any non-zero value
        return (ids > 0).astype("int64")
    if ids.size and int(ids.max()) >= num_classes:
        raise DataError(f"{path}: holds id {int(ids.max())}; the classes are 0..{num_classes - 1}")
    return ids
