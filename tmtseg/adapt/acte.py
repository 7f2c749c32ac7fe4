"""ACTE, the Adaptive Cluster-based Transferability Estimator (docs/method.md §4): soft SLIC-style
clustering of a feature map into adaptively shaped regions, a region discriminator behind a GRL,
and the dense transferability map T(p) = sum_r a(p, r) t_r."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.adapt.domain import Discriminator, binary_entropy_bits, domain_bce, grad_reverse
from tmtseg.errors import ConfigError
from tmtseg.settings import setting


@dataclass
class ACTESettings:
    """`adapt.acte`: ACTE's clustering and the map it reads (docs/method.md §4)."""

    cell: int = setting(4, low=1)  # c: regions start as c x c cells; c = 8 leaves only ~4-12 regions on CPU-size crops
    iters: int = setting(3, low=0)  # L: soft-clustering iterations; 0 = fixed square patches
    kappa: float = setting(10.0, low=0, positive=True)  # temperature on the cosine similarity
    feature_stride: int = setting(8, choices=(8, 16, 32))  # which pixel-decoder map clusters
    # "decoder": the pixel decoder's map at feature_stride (the paper's reading: the adversarial loss then shapes those
    # features); "vit": the frozen ViT's token map at stride 16 (an extension: docs/results.md §7)
    features: str = setting("decoder", choices=("decoder", "vit"))
    # TMA in the ViT (adapt.tma.where=vit|both): the ViT block whose input ACTE reads; -1 = the first biased block
    vit_block: int = setting(-1, low=-1)
    # ... and how many consecutive blocks from there T pools: the mean of their layer-normed input tokens (1 = that
    # block alone); every pooled block must come before the first biased one, so the bias changes none of them
    vit_pool: int = setting(1, low=1)


# The 3x3 cell neighbourhood, row-major: channel k of an assignment is the region at cell offset OFFSETS[k].
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
CENTER = OFFSETS.index((0, 0))


def _neighbours(grid: Tensor) -> Tensor:
    """The 9 shifted copies of a region grid [B, C, Hc, Wc] -> [B, 9, C, Hc, Wc]; out-of-grid = 0."""
    hc, wc = grid.shape[-2:]
    padded = F.pad(grid, (1, 1, 1, 1))  # [B, C, Hc+2, Wc+2]
    return torch.stack([padded[..., 1 + dy : 1 + dy + hc, 1 + dx : 1 + dx + wc] for dy, dx in OFFSETS], dim=1)


def _scatter_neighbours(per_offset: Tensor) -> Tensor:
    """Inverse of :func:`_neighbours`: [B, 9, C, Hc, Wc] contributions of each cell to its 9 neighbour
    regions, summed per region -> [B, C, Hc, Wc]; contributions to out-of-grid regions are dropped.

    Each offset's contributions are padded into place on the (Hc+2, Wc+2) grid and summed in offset order (the
    same additions as writing them into slices; no in-place write, which ONNX export turns into a ScatterND with
    its own index arithmetic per offset)."""
    acc = None
    for k, (dy, dx) in enumerate(OFFSETS):
        placed = F.pad(per_offset[:, k], (1 + dx, 1 - dx, 1 + dy, 1 - dy))  # [B, C, Hc+2, Wc+2]
        acc = placed if acc is None else acc + placed
    return acc[..., 1:-1, 1:-1]


def _to_cells(x: Tensor, cell: int) -> Tensor:
    """[B, C, Hc*c, Wc*c] -> [B, C, Hc, c, Wc, c]."""
    b, ch, hp, wp = x.shape
    return x.reshape(b, ch, hp // cell, cell, wp // cell, cell)


@dataclass
class Regions:
    """A soft clustering: each pixel's weights over the 9 regions of its cell's 3x3 neighbourhood.

    ``assign`` [B, 9, H, W] (sums to 1 over dim 1), ``features`` [B, R, C] region means, ``mass`` [B, R]
    = sum_p a(p, r), ``grid`` (Hc, Wc) with R = Hc * Wc (region r = row * Wc + col), ``cell`` = c.
    """

    assign: Tensor
    features: Tensor
    mass: Tensor
    grid: tuple[int, int]
    cell: int

    def _cell_assign(self) -> Tensor:
        """Assignments zero-padded to the cell grid: [B, 9, Hc, c, Wc, c]."""
        hc, wc = self.grid
        h, w = self.assign.shape[-2:]
        padded = F.pad(self.assign, (0, wc * self.cell - w, 0, hc * self.cell - h))  # [B, 9, Hc*c, Wc*c]
        return _to_cells(padded, self.cell)

    def dense(self, values: Tensor) -> Tensor:
        """Per-pixel ``sum_r a(p, r) * values_r`` for values [B, R] -> [B, 1, H, W], via the 9-neighbour gather."""
        hc, wc = self.grid
        h, w = self.assign.shape[-2:]
        neigh = _neighbours(values.reshape(-1, 1, hc, wc))[:, :, 0]  # [B, 9, Hc, Wc]
        out = (self._cell_assign() * neigh[:, :, :, None, :, None]).sum(1)  # [B, Hc, c, Wc, c]
        return out.reshape(-1, 1, hc * self.cell, wc * self.cell)[..., :h, :w]  # [B, 1, H, W]

    def region_ids(self) -> Tensor:
        """Hard region map [B, H, W] (int64): the argmax neighbour of every pixel, as a region index."""
        hc, wc = self.grid
        h, w = self.assign.shape[-2:]
        k = self.assign.argmax(1)  # [B, H, W]
        offsets = torch.tensor(OFFSETS, device=k.device)  # [9, 2]
        rows = torch.arange(h, device=k.device)[:, None] // self.cell + offsets[k, 0]  # [B, H, W]
        cols = torch.arange(w, device=k.device)[None, :] // self.cell + offsets[k, 1]  # [B, H, W]
        return rows * wc + cols  # the argmax is never an out-of-grid neighbour: its weight is exactly 0

    def detached(self) -> Regions:
        return dataclasses.replace(
            self, assign=self.assign.detach(), features=self.features.detach(), mass=self.mass.detach()
        )


def soft_cluster(x: Tensor, *, cell: int, iters: int, kappa: float) -> Regions:
    """Differentiable SLIC on cosine similarity (docs/method.md §4 steps 1-4), memory O(9 * P).

    Starts from the c x c cell grid (zero padding to multiples of c is masked out of the region means);
    each of ``iters`` rounds recomputes region means, then re-assigns each pixel with a softmax over
    kappa * cos to the 9 neighbouring regions. iters = 0 is the fixed grid.
    """
    b, ch, h, w = x.shape
    hc, wc = -(-h // cell), -(-w // cell)
    pad = (0, wc * cell - w, 0, hc * cell - h)
    pix = _to_cells(F.pad(x, pad), cell)  # [B, C, Hc, c, Wc, c]
    pix_unit = F.normalize(pix, dim=1)  # padding stays 0, so its cosine to every region is 0
    valid = _to_cells(F.pad(x.new_ones(1, 1, h, w), pad), cell)  # [1, 1, Hc, c, Wc, c]
    # Out-of-grid neighbours get -inf logits; the centre is always in the grid, so no row is all -inf.
    in_grid = _neighbours(x.new_ones(1, 1, hc, wc))[:, :, 0] > 0  # [1, 9, Hc, Wc]
    in_grid = in_grid[:, :, :, None, :, None]  # [1, 9, Hc, 1, Wc, 1]

    # every pixel starts hard-assigned to its own cell (built without an in-place write: ONNX export mis-folds that)
    start = (torch.arange(9, device=x.device) == CENTER).to(x.dtype)  # [9]
    assign = start.view(1, 9, 1, 1, 1, 1).expand(b, 9, hc, cell, wc, cell)  # [B, 9, Hc, c, Wc, c]

    def region_means(assign: Tensor) -> tuple[Tensor, Tensor]:
        weight = assign * valid  # [B, 9, Hc, c, Wc, c]
        mass = _scatter_neighbours(weight.sum((3, 5))[:, :, None])[:, 0]  # [B, Hc, Wc]
        sums = _scatter_neighbours(torch.einsum("bkhiwj,bchiwj->bkchw", weight, pix))  # [B, C, Hc, Wc]
        # A region that lost all its pixels gets a zero feature: cosine 0 to everyone, not NaN.
        return sums / mass.clamp_min(1e-6)[:, None], mass

    for _ in range(iters):
        feats, _ = region_means(assign)
        neigh = F.normalize(_neighbours(feats), dim=2)  # [B, 9, C, Hc, Wc]
        cos = torch.einsum("bkchw,bchiwj->bkhiwj", neigh, pix_unit)  # [B, 9, Hc, c, Wc, c]
        assign = (kappa * cos).masked_fill(~in_grid, float("-inf")).softmax(1)

    feats, mass = region_means(assign)
    assign = assign.reshape(b, 9, hc * cell, wc * cell)[..., :h, :w]  # [B, 9, H, W]
    features = feats.flatten(2).transpose(1, 2)  # [B, R, C]
    return Regions(assign=assign, features=features, mass=mass.flatten(1), grid=(hc, wc), cell=cell)


class ACTE(nn.Module):
    """Soft clustering + region discriminator + transferability map (docs/method.md §4).

    forward(x [B, C, H, W], grl_coeff) -> dict(regions, disc_logits [B, R], transferability [B, R],
    tmap [B, 1, H, W]); ``grl_coeff=None`` skips the gradient reversal (inference).
    """

    def __init__(
        self, *, in_dim: int, cell: int, iters: int, kappa: float, disc_hidden: int, disc_dropout: float
    ) -> None:
        super().__init__()
        if cell < 1 or iters < 0:
            raise ConfigError(f"ACTE needs cell >= 1 and iters >= 0, got cell={cell}, iters={iters}")
        self.cell = cell
        self.iters = iters
        self.kappa = kappa
        self.discriminator = Discriminator(in_dim=in_dim, hidden=disc_hidden, dropout=disc_dropout)

    def cluster(self, x: Tensor) -> Regions:
        return soft_cluster(x, cell=self.cell, iters=self.iters, kappa=self.kappa)

    def forward(self, x: Tensor, *, grl_coeff: float | Tensor | None) -> dict:
        regions = self.cluster(x)
        feats = regions.features if grl_coeff is None else grad_reverse(regions.features, grl_coeff)
        logits = self.discriminator(feats)  # [B, R]
        transferability = binary_entropy_bits(torch.sigmoid(logits))  # [B, R]
        # The map is an input signal to TMA, not a training path: only the GRL'd discriminator loss
        # shapes the features (docs/method.md §4 [choice]), so assignments and t are both detached here.
        tmap = regions.detached().dense(transferability.detach())  # [B, 1, H, W]
        return {"regions": regions, "disc_logits": logits, "transferability": transferability, "tmap": tmap}

    @staticmethod
    def loss(outputs: dict, is_source: bool | Tensor) -> Tensor:
        """Region-mass-weighted domain BCE (label 1 = source). The mass weight is detached: without the
        GRL on that path, its gradient would help the discriminator instead of confusing it."""
        return domain_bce(outputs["disc_logits"], is_source, weight=outputs["regions"].mass.detach())
