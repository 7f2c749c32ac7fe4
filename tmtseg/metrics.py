"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, foreground Dice/IoU for binary tasks."""

from __future__ import annotations

import math

import numpy as np
import torch


class SegMetrics:
    """Accumulates a K x K confusion matrix (rows = ground truth, columns = prediction) over images."""

    def __init__(
        self, *, num_classes: int, ignore_index: int, class_names: list[str] | None = None, binary: bool = False
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
        self.binary = binary
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.image_dice: list[float] = []  # binary only: per-image foreground Dice (the polyp literature's mean Dice)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: int [H, W] or [B, H, W]; label pixels equal to ignore_index are left out."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        if pred.dim() == 2:
            pred, label = pred[None], label[None]
        for p, g in zip(pred, label):
            valid = g != self.ignore_index
            k = self.num_classes
            cm = torch.bincount(g[valid].long() * k + p[valid].long(), minlength=k * k).reshape(k, k)
            self.confusion += cm.cpu()
            if self.binary:
                tp, fp, fn = cm[1, 1].item(), cm[0, 1].item(), cm[1, 0].item()
                denom = 2 * tp + fp + fn
                self.image_dice.append(1.0 if denom == 0 else 2 * tp / denom)

    def merge(self, confusion: torch.Tensor) -> None:
        self.confusion += confusion.cpu()

    def compute(self) -> dict:
        """mIoU (nan-mean over classes present in prediction or ground truth), per-class IoU, accuracy; in percent."""
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = tp / union  # nan where a class is absent from both
        out: dict = {
            "mIoU": float(np.nanmean(iou.numpy()) * 100) if (union > 0).any() else float("nan"),
            "aAcc": float(tp.sum() / cm.sum().clamp(min=1) * 100),
            "per_class_iou": {
                n: (float(v) * 100 if not math.isnan(v) else None) for n, v in zip(self.class_names, iou)
            },
            "pixels": int(cm.sum()),
        }
        if self.binary:
            tp1, fp1, fn1 = tp[1], cm[0, 1], cm[1, 0]
            out["dice"] = float(2 * tp1 / (2 * tp1 + fp1 + fn1).clamp(min=1) * 100)
            out["iou"] = float(tp1 / (tp1 + fp1 + fn1).clamp(min=1) * 100)
            if self.image_dice:
                out["mean_image_dice"] = float(np.mean(self.image_dice) * 100)
                out["std_image_dice"] = float(np.std(self.image_dice) * 100)
        return out


def format_table(metrics: dict, *, title: str = "") -> str:
    """A plain-text table of the headline metrics and per-class IoU."""
    lines = [title] if title else []
    head = [("mIoU", metrics["mIoU"]), ("aAcc", metrics["aAcc"])]
    for key in ("dice", "iou", "mean_image_dice"):
        if key in metrics:
            head.append((key, metrics[key]))
    lines.append("  ".join(f"{k} {v:6.2f}" for k, v in head))
    width = max(len(n) for n in metrics["per_class_iou"]) + 2
    lines.append(f"{'class':<{width}}IoU")
    for name, v in metrics["per_class_iou"].items():
        lines.append(f"{name:<{width}}{'  n/a' if v is None else f'{v:6.2f}'}")
    return "\n".join(lines)
