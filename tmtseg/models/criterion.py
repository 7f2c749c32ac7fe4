"""The set criterion (method.md §3, Mask2Former): Hungarian matching, class cross-entropy with a down-weighted
no-object class, mask BCE and Dice on importance-sampled points, deep supervision; ignore pixels carry no weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataError
from .matcher import HungarianMatcher, point_sample, pred_coord_scale, sample_targets


def semantic_targets(label: Tensor, *, num_classes: int, ignore_index: int) -> dict[str, Tensor]:
    """A semantic label map [H, W] -> one binary mask per present class: labels [M], masks bool [M, H, W], valid
    bool [H, W] (False at ignore_index). Raises DataError for ids that are neither a class nor the ignore value."""
    valid = label != ignore_index
    ids = label[valid]
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.numel():
        raise DataError(f"label ids {sorted(set(bad.tolist()))} outside [0, {num_classes}) and not {ignore_index}")
    classes = torch.unique(ids)  # sorted
    masks = label[None] == classes[:, None, None]  # [M, H, W]
    return {"labels": classes.long(), "masks": masks, "valid": valid}


def uncertain_point_coords(logits: Tensor, *, num_points: int, oversample_ratio: float, importance_ratio: float):
    """PointRend's sampling: of oversample_ratio * num_points random points keep the importance_ratio share whose
    logits are closest to 0 (most uncertain), and fill up with fresh random points. logits [M, 1, h, w] -> [M, P, 2]."""
    M = logits.shape[0]
    candidates = torch.rand(M, int(num_points * oversample_ratio), 2, device=logits.device)  # [M, P', 2]
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # [M, P']
    num_uncertain = int(importance_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # [M, P_u]
    coords = candidates.gather(1, idx[..., None].expand(-1, -1, 2))  # [M, P_u, 2]
    extra = torch.rand(M, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([coords, extra], dim=1)  # [M, P, 2]


class SetCriterion(nn.Module):
    """Mask2Former's loss. forward(outputs, targets, num_masks=None) -> dict of weighted losses and their sum `loss`.

    targets: per image labels int64 [M], masks bool/float [M, H, W] at label resolution, valid bool [H, W] (optional).
    outputs may carry point_weight [B, 1, h, w] on the pred_masks grid: a per-pixel weight of the mask losses.
    Keys: loss_ce, loss_mask, loss_dice for the last layer, the same with _i for aux_outputs[i], and loss.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float,
        mask_weight: float,
        dice_weight: float,
        no_object_weight: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool,
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @staticmethod
    def num_masks(targets: list[dict]) -> float:
        """Ground-truth masks in this batch (the normaliser; under DDP the engine averages it over processes)."""
        return float(sum(len(t["labels"]) for t in targets))

    def loss_labels(self, pred_logits: Tensor, targets: list[dict], indices) -> Tensor:
        B, Q = pred_logits.shape[:2]
        gt_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=pred_logits.device)  # [B, Q]
        for b, (src, tgt) in enumerate(indices):
            gt_classes[b, src.to(gt_classes.device)] = targets[b]["labels"][tgt].to(gt_classes.device)
        return F.cross_entropy(pred_logits.float().transpose(1, 2), gt_classes, self.empty_weight)  # [B, K+1, Q]

    def loss_masks(
        self, pred_masks: Tensor, targets: list[dict], indices, num_masks: float, point_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """BCE and Dice on sampled points; `point_weight` [B, 1, h, w] (at pred_masks' grid) scales each point."""
        batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query = torch.cat([src for src, _ in indices])
        if query.numel() == 0:  # no ground truth anywhere: zero that keeps the graph
            zero = pred_masks.sum() * 0.0
            return zero, zero
        pred = pred_masks[batch.to(pred_masks.device), query.to(pred_masks.device)].float()[:, None]  # [M, 1, h, w]
        with torch.no_grad():
            coords = uncertain_point_coords(
                pred,
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_ratio=self.importance_sample_ratio,
            )  # [M, P, 2] in prediction coordinates
            gts, ws, start = [], [], 0
            for b, (_, tgt) in enumerate(indices):
                t, n = targets[b], len(tgt)
                masks = t["masks"][tgt.to(t["masks"].device)]  # [m, H, W]
                valid = t.get("valid")
                if valid is None:
                    valid = torch.ones(masks.shape[-2:], dtype=torch.bool, device=masks.device)
                scale = pred_coord_scale(pred.shape[-2:], masks.shape[-2:], device=coords.device)
                gt_coords = coords[start : start + n] / scale  # [m, P, 2] in label coordinates
                gt, w = sample_targets(masks.to(coords.device), valid.to(coords.device), gt_coords)
                gts.append(gt)
                ws.append(w)
                start += n
            gt, w = torch.cat(gts), torch.cat(ws)  # [M, P]
            if point_weight is not None:
                pw = point_weight[batch.to(point_weight.device)].float()  # [M, 1, h, w]
                w = w * point_sample(pw, coords, padding_mode="border")[:, 0]  # [M, P]
        logits = point_sample(pred, coords)[:, 0]  # [M, P]
        bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")  # [M, P]
        loss_mask = ((bce * w).sum(1) / w.sum(1).clamp(min=1e-6)).sum() / num_masks
        p = logits.sigmoid() * w  # [M, P]
        dice = 1 - (2 * (p * gt).sum(1) + 1) / (p.sum(1) + (gt * w).sum(1) + 1)  # [M]
        return loss_mask, dice.sum() / num_masks

    def _losses(self, outputs: dict, targets: list[dict], num_masks: float, suffix: str) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(
            outputs["pred_masks"], targets, indices, num_masks, point_weight=outputs.get("point_weight")
        )
        raw = {"loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices)}
        raw.update(loss_mask=loss_mask, loss_dice=loss_dice)
        return {k + suffix: self.weights[k] * v for k, v in raw.items()}

    def forward(self, outputs: dict, targets: list[dict], num_masks: float | None = None) -> dict[str, Tensor]:
        n = max(self.num_masks(targets) if num_masks is None else float(num_masks), 1.0)
        losses = self._losses(outputs, targets, n, "")
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux = {**aux, "point_weight": outputs.get("point_weight")}  # the same per-pixel weights on every layer
                losses.update(self._losses(aux, targets, n, f"_{i}"))
        losses["loss"] = sum(losses.values())
        return losses
