"""Training logs: metrics.jsonl, the source of truth (what a resume trims and reads), and with
train.log_to=[jsonl, tensorboard] the same scalars plus prediction overlays and transferability maps in TensorBoard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from tmtseg.errors import ConfigError, MissingExtra

LOG_TO = ("jsonl", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


def _flat(prefix: str, value) -> dict[str, float]:
    """Numeric leaves of a nested record as TensorBoard tags: {"eval": {"iou": {"road": 0.5}}} -> eval/iou/road."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}/{k}" if prefix else str(k), v))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


class TrainLog:
    """The log of a run, written by rank 0 only (`main`). `write(record)` appends to metrics.jsonl (and TensorBoard);
    `pictures(step, ...)` adds a few prediction overlays and transferability maps to TensorBoard at an evaluation."""

    def __init__(self, run_dir: Path, *, log_to: list[str], start_step: int, resume: bool, main: bool = True) -> None:
        unknown = [x for x in log_to if x not in LOG_TO]
        if unknown:
            raise ConfigError(f"config key train.log_to: unknown {unknown}; choose from {list(LOG_TO)}")
        self.jsonl, self.main = Path(run_dir) / "metrics.jsonl", main
        self.writer = None
        if "tensorboard" in log_to:
            try:  # on every rank, so that all of them stop together
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingExtra(
                    "config key train.log_to=[tensorboard] needs the tensorboard package: pip install "
                    "'tmtseg[tensorboard]'"
                ) from None
        if "tensorboard" in log_to and main:
            folder = Path(run_dir) / TENSORBOARD_DIR
            if not resume:  # a fresh start logs from scratch, as metrics.jsonl does
                shutil.rmtree(folder, ignore_errors=True)
            # purge_step: events an interrupted run wrote after its checkpoint (steps > start_step; a record's step is
            # the number of steps done) are hidden, so a resume appends cleanly
            self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if resume else None)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        log_jsonl(self.jsonl, record)
        if self.writer is None or "step" not in record:
            return
        step = record["step"]
        group = "val" if "eval" in record else "train"
        for tag, value in _flat("", {k: v for k, v in record.items() if k != "step"}).items():
            self.writer.add_scalar(f"{group}/{tag.removeprefix('eval/')}", value, step)
        self.writer.flush()  # a killed run keeps what it logged up to its checkpoint

    @torch.no_grad()
    def pictures(self, step: int, trainer, dataset, *, device, count: int = 2) -> None:
        """Overlays of the prediction (and, for a method that estimates one, the transferability map T) of the first
        `count` images of `dataset`, as the model infers at this step."""
        if self.writer is None:
            return
        from tmtseg.io.pictures import colorize, overlay
        from tmtseg.modeling.inference import input_scores

        was_training = trainer.training
        trainer.eval()
        palette = np.asarray(dataset.palette, dtype=np.uint8)
        for i in range(min(count, len(dataset))):
            image = dataset[i]["image"][None].to(device)  # [1, 3, H, W] uint8
            out = trainer.model(image, hooks=trainer.method.inference_hooks())
            pred = input_scores(out, image).argmax(1)[0].cpu().numpy()  # [H, W]
            rgb = image[0].permute(1, 2, 0).cpu().numpy()
            picture = overlay(rgb, colorize(pred, palette))  # [H, W, 3]
            self.writer.add_image(f"pictures/{i}/prediction", picture, step, dataformats="HWC")
            hw = tuple(out["pred_masks"].shape[-2:])
            tmap = trainer.method.transferability(out.get("adapt", {}), hw)  # [1, 1, h, w] or None
            if tmap is not None:
                self.writer.add_image(f"pictures/{i}/transferability", tmap[0].clamp(0, 1).cpu(), step)
        self.writer.flush()
        trainer.train(was_training)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def log_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path, *, upto_step: int) -> list[str]:
    """The log's lines up to `upto_step`; a line cut short by a kill is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= upto_step:
            kept.append(line)
    return kept
