"""Hungarian matching of predicted masks to ground-truth masks (docs/method.md §3, Mask2Former's matcher): class +
sigmoid BCE + Dice costs on the same random points for predictions and targets, in float32 without gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_sum_assignment(cost):
    """scipy's Hungarian solver, imported at the first match, not at the top: scipy.optimize is a third of a second
    of every start, and predict, eval, export and the data commands never match."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost)


def uniform_coords(*shape: int, low: float = 0.0, high: float = 1.0, device=None) -> Tensor:
    """Uniform random numbers in (low, high), float32 of `shape`, at 16-bit resolution (the centres of 65536 equal
    bins): point coordinates, where 2^-16 of the map is far below a pixel. Drawn four per 64-bit random integer from
    the global generator: on CPU half the time of torch.rand, whose generator yields one 32-bit draw per number."""
    n = math.prod(shape)
    # from the int64 minimum with no upper bound: PyTorch's full 64-bit range (CPU and CUDA), every bit uniform
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    u = bits.view(torch.int16)[:n].float()  # [n] in [-32768, 32767]
    return u.add_(32768.5).mul_((high - low) / 65536).add_(low).view(shape)


def grid_sample_points(x: Tensor, grid: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """Bilinear samples of x [N, C, H, W] at points [N, P, 2] (x, y) in grid_sample's [-1, 1] frame -> [N, C, P];
    outside the map's pixel centres: blended with 0 ("zeros") or the edge value ("border")."""
    return F.grid_sample(x, grid[:, :, None], align_corners=False, padding_mode=padding_mode)[..., 0]  # [N, C, P]


def point_sample(x: Tensor, coords: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """`grid_sample_points` at coords [N, P, 2] (x, y) in [0, 1] -> [N, C, P]."""
    return grid_sample_points(x, 2.0 * coords - 1.0, padding_mode=padding_mode)


def pred_coord_scale(pred_hw: tuple[int, int], gt_hw: tuple[int, int], *, device=None) -> Tensor:
    """Factor [2] (x, y) mapping normalised ground-truth coordinates to the stride-4 prediction's.

    pred_masks cover 4 * ceil(H/4) pixels, a little more than an image of H pixels; the factor lines the two up. A
    ground truth at another resolution (not within one stride) is taken to span the same field of view.
    """
    scale = []
    for p, g in zip(reversed(pred_hw), reversed(gt_hw), strict=True):
        scale.append(g / (4 * p) if 4 * (p - 1) < g <= 4 * p else 1.0)
    return torch.tensor(scale, dtype=torch.float32, device=device)


def target_valid(target: dict) -> Tensor:
    """A target's valid-pixel map [H, W]: its `valid`, or every pixel of its masks when it has none."""
    valid = target.get("valid")
    if valid is None:
        valid = torch.ones(target["masks"].shape[-2:], dtype=torch.bool, device=target["masks"].device)
    return valid


def sample_targets(masks: Tensor, valid: Tensor, coords: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ground truth at points: masks [M, H, W], valid [H, W] -> (labels, weights). Labels are interpolated over valid
    pixels only; weights are the valid fraction (0 inside ignore regions).

    - coords [1, P, 2], no index: every mask at the same points -> labels [M, P], weights [1, P];
    - coords [N, P, 2] and index [N] (default: N = M, row m is mask m): row n is mask index[n] at its own points ->
      [N, P], [N, P]. Each mask is read by one call for all its rows and the valid map by one call for all rows: the
      values of a per-row sampling, bit for bit, without an [N, H, W] copy of the masks.
    """
    n, P = coords.shape[:2]
    if index is None and n == 1:  # the same points for every mask: sample the masks as channels of one map
        gt = point_sample(masks[None].float(), coords)[0]  # [M, P]
        w = point_sample(valid[None, None].float(), coords)[:, 0]  # [1, P]
    else:
        index = torch.arange(n, device=coords.device) if index is None else index
        w = point_sample(valid[None, None].float(), coords.reshape(1, n * P, 2))[0, 0].view(n, P)
        gt = coords.new_empty(n, P)
        for m in torch.unique(index).tolist():
            rows = (index == m).nonzero()[:, 0]
            gt[rows] = point_sample(masks[m][None, None].float(), coords[rows].reshape(1, -1, 2))[0, 0].view(-1, P)
    # masks are 0 at ignored pixels, so dividing by the sampled valid fraction renormalises the interpolation
    return gt / w.clamp(min=1e-6) * (w > 0), w


def batch_sigmoid_ce(pred: Tensor, gt: Tensor, w: Tensor) -> Tensor:
    """Weighted mean BCE of every prediction [.., Q, P] against every target [.., M, P] with point weights [.., 1, P]
    -> [.., Q, M]."""
    # BCE(x, g) = softplus(x) - g x, so the weighted sums over points are two matmuls: softplus(x) @ w and x @ (g w)
    # (Mask2Former's two matmuls, against g and 1 - g, give the same up to rounding); the weights go on the M targets
    # and the single weight row, never over the Q predictions
    return (F.softplus(pred) @ w.mT - pred @ (gt * w).mT) / w.sum(-1, keepdim=True).clamp(min=1e-6)  # [.., Q, M]


def batch_dice(pred: Tensor, gt: Tensor, w: Tensor) -> Tensor:
    """Dice cost of every prediction [.., Q, P] against every target [.., M, P] with point weights [.., 1, P] ->
    [.., Q, M]."""
    p, gw = pred.sigmoid(), gt * w  # [.., Q, P], [.., M, P]
    numerator = 2 * p @ gw.mT  # [.., Q, M]: the weighted intersection
    denominator = p @ w.mT + gw.sum(-1)[..., None, :]  # [.., Q, 1] + [.., 1, M]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth masks minimising the weighted sum of the three costs."""

    def __init__(self, *, cost_class: float, cost_mask: float, cost_dice: float, num_points: int) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(self, logits: Tensor, masks: Tensor, target: dict, coords: Tensor) -> Tensor:
        """logits [Q, K+1], masks [Q, h, w], target dict (labels [M], masks [M, H, W], valid [H, W]), coords [P, 2]
        -> cost [Q, M]. With a leading layer dimension (logits [L, Q, K+1], masks [L, Q, h, w], coords [L, P, 2]):
        every layer's cost at once, [L, Q, M]."""
        if logits.ndim == 2:
            return self.cost_matrix(logits[None], masks[None], target, coords[None])[0]
        gt_masks = target["masks"]
        valid = target_valid(target)
        L, P = coords.shape[:2]
        gt, w = sample_targets(gt_masks, valid, coords.reshape(1, L * P, 2))  # every layer's points in one draw
        gt = gt.view(-1, L, P).transpose(0, 1)  # [L, M, P]
        w = w.view(1, L, P).transpose(0, 1)  # [L, 1, P]
        scale = pred_coord_scale(masks.shape[-2:], gt_masks.shape[-2:], device=coords.device)
        pred = point_sample(masks, coords * scale)  # [L, Q, P]
        cost_class = -logits.softmax(-1)[..., target["labels"]]  # [L, Q, M]
        return (
            self.cost_class * cost_class
            + self.cost_mask * batch_sigmoid_ce(pred, gt, w)
            + self.cost_dice * batch_dice(pred, gt, w)
        )

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B, Q, K+1], pred_masks [B, Q, h, w]; targets: per image labels [M], masks [M, H, W],
        valid [H, W] (optional). Returns per image (query indices, target indices), int64 [min(Q, M)] each.

        One set of random points serves the whole batch, so a batch matches exactly like its images one by one under
        the same seed.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """`forward` for the predictions of several decoder layers at once (deep supervision): the cost matrices of
        all layers of an image come from one batched computation, with one set of random points per layer.
        Returns per layer what `forward` returns; for one layer it draws and matches exactly as `forward`."""
        logits = torch.stack([o["pred_logits"] for o in layers])  # [L, B, Q, K+1]
        masks = torch.stack([o["pred_masks"] for o in layers])  # [L, B, Q, h, w]
        L, device = len(layers), logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            coords = uniform_coords(L, self.num_points, 2, device=device)  # [L, P, 2]
            indices: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(L)]
            for b, target in enumerate(targets):
                if len(target["labels"]) == 0:
                    for per_layer in indices:
                        empty = torch.zeros(0, dtype=torch.int64)
                        per_layer.append((empty, empty.clone()))
                    continue
                cost = self.cost_matrix(logits[:, b].float(), masks[:, b].float(), target, coords)  # [L, Q, M]
                # a non-finite prediction must reach the loss (where the engine handles it), not crash scipy here
                cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
                for per_layer, c in zip(indices, cost, strict=True):
                    rows, cols = linear_sum_assignment(c)
                    per_layer.append(
                        (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                    )
        return indices
