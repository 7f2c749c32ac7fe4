"""Pixel decoders (docs/method.md §3): fuse the backbone pyramid into the decoder's multi-scale memory (strides 32, 16,
8) and the stride-4 mask features. `fpn` is a light FPN; `msdeform` is Mask2Former's deformable-attention encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.modeling.layers import group_norm, sine_position_encoding
from tmtseg.modeling.pixel_decoders.msdeform_attn import DeformableEncoderLayer, reference_points

MEMORY_STRIDES = (32, 16, 8)  # coarse to fine: the order the decoder's round-robin visits them


def conv_norm(in_dim: int, out_dim: int, kernel_size: int, *, relu: bool) -> nn.Sequential:
    """Conv (no bias) + GroupNorm (+ ReLU), Mask2Former's `Conv2d(norm=GN)` building block."""
    layers = [nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False), group_norm(out_dim)]
    if relu:
        layers.append(nn.ReLU())
    out = nn.Sequential(*layers)
    nn.init.kaiming_uniform_(out[0].weight, a=1)  # detectron2's c2_xavier_fill
    return out


class FPNPixelDecoder(nn.Module):
    """Light FPN: from stride 32 down to 4, lateral 1x1 + nearest top-down sum + 3x3; a 3x3 conv to the mask dim."""

    def __init__(self, *, in_dim: int, conv_dim: int, mask_dim: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.strides = sorted(strides, reverse=True)  # coarse to fine
        self.lateral = nn.ModuleDict({str(s): conv_norm(in_dim, conv_dim, 1, relu=False) for s in self.strides[1:]})
        self.output = nn.ModuleDict(
            {
                str(s): conv_norm(in_dim if i == 0 else conv_dim, conv_dim, 3, relu=True)
                for i, s in enumerate(self.strides)
            }
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)

    def forward(self, pyramid: dict[int, Tensor]) -> dict:
        """{stride: [B, Cb, H/s, W/s]} -> dict(multi_scale [B, C, H/s, W/s] for s = 32, 16, 8; mask_features [B, Cm,
        H/4, W/4])."""
        maps: dict[int, Tensor] = {}
        y = self.output[str(self.strides[0])](pyramid[self.strides[0]])  # [B, C, H/32, W/32]
        maps[self.strides[0]] = y
        for s in self.strides[1:]:
            x = self.lateral[str(s)](pyramid[s])  # [B, C, H/s, W/s]
            y = self.output[str(s)](x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))  # [B, C, H/s, W/s]
            maps[s] = y
        return {"multi_scale": [maps[s] for s in MEMORY_STRIDES], "mask_features": self.mask_features(y)}


class MSDeformPixelDecoder(nn.Module):
    """Mask2Former's MSDeformAttnPixelDecoder: deformable encoder over strides 32/16/8, then an FPN step to stride 4."""

    def __init__(
        self,
        *,
        in_dim: int,
        conv_dim: int,
        mask_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, conv_dim, kernel_size=1), group_norm(conv_dim)) for _ in MEMORY_STRIDES
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.randn(len(MEMORY_STRIDES), conv_dim))  # normal init as Mask2Former
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                dim=conv_dim,
                num_levels=len(MEMORY_STRIDES),
                num_heads=num_heads,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.lateral = conv_norm(in_dim, conv_dim, 1, relu=False)
        self.output = conv_norm(conv_dim, conv_dim, 3, relu=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)

    def forward(self, pyramid: dict[int, Tensor]) -> dict:
        """Same contract as FPNPixelDecoder.forward."""
        srcs, pos, shapes = [], [], []
        for lvl, (s, proj) in enumerate(zip(MEMORY_STRIDES, self.input_proj, strict=True)):
            x = proj(pyramid[s])  # [B, C, H/s, W/s]
            B, C, h, w = x.shape
            shapes.append((h, w))
            p = sine_position_encoding((B, h, w), num_feats=C // 2, device=x.device, dtype=x.dtype)  # [B, C, h, w]
            srcs.append(x.flatten(2).transpose(1, 2))  # [B, h*w, C]
            pos.append(p.flatten(2).transpose(1, 2) + self.level_embed[lvl])  # [B, h*w, C]
        src, pos_all = torch.cat(srcs, 1), torch.cat(pos, 1)  # [B, N, C]
        ref = reference_points(shapes, device=src.device).to(src.dtype)  # [1, N, 2]
        for layer in self.layers:
            src = layer(src, pos_all, ref, shapes)  # [B, N, C]
        maps = [
            m.transpose(1, 2).reshape(src.shape[0], -1, h, w)  # [B, h*w, C] -> [B, C, h, w]
            for m, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
        ]
        x = self.lateral(pyramid[4])  # [B, C, H/4, W/4]
        y = self.output(x + F.interpolate(maps[-1], size=x.shape[-2:], mode="bilinear", align_corners=False))
        return {"multi_scale": maps, "mask_features": self.mask_features(y)}  # mask_features [B, Cm, H/4, W/4]
