"""The set criterion (docs/method.md §3, Mask2Former): Hungarian matching, class cross-entropy with a down-weighted
no-object class, mask BCE and Dice on importance-sampled points, deep supervision; ignore pixels carry no weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from tmtseg.errors import DataError
from tmtseg.losses.matcher import (
    HungarianMatcher,
    grid_sample_points,
    point_sample,
    pred_coord_scale,
    sample_targets,
    target_valid,
    uniform_coords,
)


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


@torch.no_grad()
def uncertain_point_coords(
    logits: Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    groups: list[int] | None = None,
) -> Tensor:
    """PointRend's sampling: of oversample_ratio * num_points random points keep the importance_ratio share whose
    logits are closest to 0 (most uncertain), and fill up with fresh random points. logits [M, 1, h, w] -> [M, P, 2].

    `groups`: sizes of consecutive runs of rows that share one draw of candidates (the criterion's rows of one image
    at one decoder layer). Each row still keeps its own most uncertain candidates and draws its own fresh points, so
    every row's points follow the same distribution as with a draw of its own (the default, `None`); a shared draw
    costs a fraction of the random numbers, and the group's masks are read as channels of one map by one grid_sample.
    """
    M, (h, w) = logits.shape[0], logits.shape[-2:]
    sizes = [1] * M if groups is None else [n for n in groups if n > 0]
    if sum(sizes) != M:
        raise ValueError(f"groups {groups} do not cover the {M} rows")
    num_candidates = int(num_points * oversample_ratio)
    # the candidates drawn in grid_sample's [-1, 1] frame: the largest tensors here, not to be rescaled
    candidates = uniform_coords(len(sizes), num_candidates, 2, low=-1.0, high=1.0, device=logits.device)  # [G, P', 2]
    if groups is None:
        value = grid_sample_points(logits.float(), candidates)[:, 0]  # [M, P']
    else:
        value = torch.cat(
            [
                grid_sample_points(rows.float().view(1, -1, h, w), candidates[g : g + 1])[0]  # [n, P']
                for g, rows in enumerate(logits.split(sizes))
            ]
        )  # [M, P']
    # the bits of a non-negative float order as the float does, and CPU top-k on int32 is ~1.5x faster than on float32
    # (the same points, unsorted: their order is irrelevant to the losses)
    num_uncertain = int(importance_ratio * num_points)
    key = value.abs_().view(torch.int32)
    idx = key.topk(num_uncertain, dim=1, largest=False, sorted=False).indices  # [M, P_u]
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(idx.device)  # [M]
    flat = (idx + group[:, None] * num_candidates).flatten()  # rows of [G * P', 2]
    coords = candidates.view(-1, 2).index_select(0, flat).view(M, num_uncertain, 2).add_(1.0).mul_(0.5)  # [0, 1]
    extra = uniform_coords(M, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([coords, extra], dim=1)  # [M, P, 2]


def aux_suffix(layer: int) -> str:
    """The key suffix of an earlier decoder layer's term under deep supervision: loss_ce_0, loss_mask_3, ..."""
    return f"_{layer}"


def is_aux_loss(key: str) -> bool:
    """Whether a loss key is an earlier decoder layer's term (logged only in the total, not one by one)."""
    head, _, tail = key.rpartition("_")
    return key.startswith("loss_") and head != "loss" and tail.isdigit()


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

    def loss_labels(self, logits: list[Tensor], targets: list[dict], indices) -> Tensor:
        """Class CE of every layer: logits per layer [B, Q, K+1], indices per layer and image -> [L]."""
        L, (B, Q) = len(logits), logits[0].shape[:2]
        gt = torch.full((L, B, Q), self.num_classes, dtype=torch.int64, device=logits[0].device)  # [L, B, Q]
        for layer, per_image in enumerate(indices):
            for b, (src, tgt) in enumerate(per_image):
                gt[layer, b, src.to(gt.device)] = targets[b]["labels"][tgt].to(gt.device)
        x = torch.stack(logits).float().flatten(0, 2)  # [L*B*Q, K+1]
        ce = F.cross_entropy(x, gt.flatten(), self.empty_weight, reduction="none").view(L, -1)  # weighted, [L, B*Q]
        return ce.sum(1) / self.empty_weight[gt].view(L, -1).sum(1)  # the weighted mean of each layer

    def loss_masks(
        self,
        pred_masks: list[Tensor],
        targets: list[dict],
        indices,
        num_masks: float,
        point_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """BCE and Dice of every layer on sampled points -> ([L], [L]). pred_masks per layer [B, Q, h, w]; the matched
        masks of all layers are sampled together. `point_weight` [B, 1, h, w] (at pred_masks' grid) scales each
        point."""
        L = len(pred_masks)
        layer, batch, query, target = [], [], [], []  # one entry per matched (query, ground-truth mask) pair
        groups = []  # the rows of each (layer, image), consecutive: they share one draw of candidate points
        for i, per_image in enumerate(indices):
            for b, (src, tgt) in enumerate(per_image):
                groups.append(len(src))
                layer.append(torch.full_like(src, i))
                batch.append(torch.full_like(src, b))
                query.append(src)
                target.append(tgt)
        layer, batch, query, target = (torch.cat(x) for x in (layer, batch, query, target))
        if query.numel() == 0:  # no ground truth anywhere: zeros that keep the graph
            zero = sum(m.sum() for m in pred_masks) * 0.0
            return zero.repeat(L), zero.repeat(L)
        device = pred_masks[0].device
        pred = torch.cat(
            [m[batch[layer == i].to(device), query[layer == i].to(device)] for i, m in enumerate(pred_masks)]
        ).float()[:, None]  # [R, 1, h, w], rows ordered by layer
        with torch.no_grad(), record_function("tmtseg.point_sampling"):
            coords = uncertain_point_coords(
                pred,
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_ratio=self.importance_sample_ratio,
                groups=groups,
            )  # [R, P, 2] in prediction coordinates
            gt = coords.new_zeros(coords.shape[:2])  # [R, P]
            w = coords.new_zeros(coords.shape[:2])  # [R, P]
            for b, t in enumerate(targets):  # every layer's rows of an image in one draw
                rows = (batch == b).nonzero()[:, 0]
                if rows.numel() == 0:
                    continue
                masks, valid = t["masks"].to(coords.device), target_valid(t).to(coords.device)  # [M, H, W], [H, W]
                scale = pred_coord_scale(pred.shape[-2:], masks.shape[-2:], device=coords.device)
                rows = rows.to(coords.device)
                index = target[rows].to(coords.device)  # which of the image's masks each row is matched to
                gt[rows], w[rows] = sample_targets(masks, valid, coords[rows] / scale, index=index)
            if point_weight is not None:
                pw = point_weight[batch.to(point_weight.device)].float()  # [R, 1, h, w]
                w = w * point_sample(pw, coords, padding_mode="border")[:, 0]  # [R, P]
        logits = point_sample(pred, coords)[:, 0]  # [R, P]
        bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")  # [R, P]
        loss_mask = (bce * w).sum(1) / w.sum(1).clamp(min=1e-6)  # [R]
        p = logits.sigmoid() * w  # [R, P]
        dice = 1 - (2 * (p * gt).sum(1) + 1) / (p.sum(1) + (gt * w).sum(1) + 1)  # [R]
        layer = layer.to(logits.device)
        per_layer = logits.new_zeros(2, L).index_add(1, layer, torch.stack([loss_mask, dice]))  # [2, L]
        return per_layer[0] / num_masks, per_layer[1] / num_masks

    def forward(self, outputs: dict, targets: list[dict], num_masks: float | None = None) -> dict[str, Tensor]:
        # float32 whatever the caller's autocast: the matcher, the point sampling and the losses take the (bf16)
        # predictions cast up, so the losses equal float32 losses of those predictions exactly
        with (
            torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False),
            record_function("tmtseg.criterion"),
        ):
            return self._losses(outputs, targets, num_masks)

    def _losses(self, outputs: dict, targets: list[dict], num_masks: float | None) -> dict[str, Tensor]:
        n = max(self.num_masks(targets) if num_masks is None else float(num_masks), 1.0)
        layers = [*outputs.get("aux_outputs", []), outputs] if self.deep_supervision else [outputs]
        suffixes = [aux_suffix(i) for i in range(len(layers) - 1)] + [""]
        with record_function("tmtseg.matcher"):
            indices = self.matcher.match_layers(layers, targets)  # one batched matching for all layers
        raw = {"loss_ce": self.loss_labels([o["pred_logits"] for o in layers], targets, indices)}  # [L] each
        # the same per-pixel weights (the final prediction's) on every layer
        raw["loss_mask"], raw["loss_dice"] = self.loss_masks(
            [o["pred_masks"] for o in layers], targets, indices, n, point_weight=outputs.get("point_weight")
        )
        losses = {}
        for i in [len(layers) - 1, *range(len(layers) - 1)]:  # the last layer's keys first
            losses.update({k + suffixes[i]: self.weights[k] * v[i] for k, v in raw.items()})
        losses["loss"] = sum(losses.values())
        return losses
