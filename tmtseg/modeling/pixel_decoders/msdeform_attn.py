"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch with `grid_sample`, and the encoder layer of
Mask2Former's MSDeformAttn pixel decoder (docs/method.md §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.modeling.layers import FFN


def ms_deform_attn_core(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Sum of attention-weighted bilinear samples of every level.

    value [B, N, h, C/h] (levels concatenated, N = sum h_l*w_l), locations [B, Nq, h, L, P, 2] in [0, 1] (x, y),
    weights [B, Nq, h, L, P] -> [B, Nq, C].
    """
    B, _, nh, dh = value.shape
    _, Nq, _, L, P, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] coordinates
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * nh, dh, h, w)  # [B*h, C/h, h_l, w_l]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*h, Nq, P, 2]
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*h, C/h, Nq, P]
        samples.append(s)
    weights = weights.transpose(1, 2).reshape(B * nh, 1, Nq, L * P)  # [B*h, 1, Nq, L*P]
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [B*h, C/h, Nq]
    return out.view(B, nh * dh, Nq).transpose(1, 2)  # [B, Nq, C]


class MSDeformAttn(nn.Module):
    """Each query attends to `num_points` learned offsets around its reference point on every level."""

    def __init__(self, *, dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: head h starts looking along direction 2*pi*h/heads, point p at distance p+1
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [h, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)  # [h, L, P, 2]
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query [B, Nq, C], reference [B or 1, Nq, 2] in [0, 1] (x, y), value [B, N, C] -> [B, Nq, C]."""
        B, Nq, C = query.shape
        h, L, P = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(B, value.shape[1], h, C // h)  # [B, N, h, C/h]
        offsets = self.sampling_offsets(query).view(B, Nq, h, L, P, 2)  # [B, Nq, h, L, P, 2] in pixels of level l
        weights = self.attention_weights(query).view(B, Nq, h, L * P).softmax(-1).view(B, Nq, h, L, P)
        normaliser = torch.tensor([(w, hh) for hh, w in shapes], dtype=query.dtype, device=query.device)  # [L, 2]
        locations = reference[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(v, shapes, locations, weights))  # [B, Nq, C]


def reference_points(shapes: list[tuple[int, int]], *, device=None) -> Tensor:
    """Pixel centres of every level, normalised to [0, 1] (x, y) -> [1, N, 2] (no padding, so valid ratios are 1)."""
    refs = []
    for h, w in shapes:
        # arange, not linspace(0.5, h - 0.5, h): the same values, and torch.export keeps h symbolic (ONNX export)
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")  # [h_l, w_l]
        refs.append(torch.stack([ref_x.flatten(), ref_y.flatten()], -1))  # [h_l*w_l, 2]
    return torch.cat(refs, 0)[None]  # [1, N, 2]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN (Mask2Former)."""

    def __init__(self, *, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim=dim, hidden_dim=ffn_dim, dropout=dropout)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """src, pos [B, N, C] (all levels flattened and concatenated) -> [B, N, C]."""
        src = self.norm(src + self.dropout(self.self_attn(src + pos, reference, src, shapes)))
        return self.ffn(src)
