"""Shared building blocks of the segmenter (docs/method.md §3): MLP, multi-head attention with an additive bias and a
post-softmax scale, the transformer FFN, sine position encoding, LayerNorm2d, stochastic depth, and a linear layer
that casts its frozen weight for autocast once."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenCastLinear(nn.Linear):
    """nn.Linear that, while its weight is frozen (requires_grad False) and it runs under autocast, casts the weight to
    the autocast dtype once and keeps the copy until the weight changes; autocast itself casts a weight that needs no
    gradient anew at every call. The outputs are bit for bit autocast's. A frozen DINOv2-S forward in bf16 on CPU
    spends ~10% of its time on those casts. The copy is rebuilt when the weight is modified in place (its version
    counter moves: optimizer steps, load_state_dict) or replaced; it is never saved."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self._cast: tuple[tuple, Tensor] | None = None  # (key of the weight it was cast from, the cast weight)

    def forward(self, x: Tensor) -> Tensor:
        w, device = self.weight, x.device.type
        if (
            not w.requires_grad
            and w.dtype == torch.float32
            and torch.is_autocast_enabled(device)
            and not torch.compiler.is_compiling()
        ):
            key = (id(w), w._version, w.device, torch.get_autocast_dtype(device))
            if self._cast is None or self._cast[0] != key:
                self._cast = (key, w.detach().to(key[-1]))
            w = self._cast[1]
        return F.linear(x, w, self.bias)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU (and optional dropout) between them; no activation after the last."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.dropout(F.relu(x))
        return x


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    dropout_p: float = 0.0,
    return_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(d) + bias) [* scale] v on [B, h, N, d] tensors; returns (output, probabilities or None).

    `bias` broadcasts to [B, h, Nq, Nk] (-inf = masked out); `scale` multiplies the probabilities afterwards with no
    renormalisation (TMA's multiplicative form). Without scale or probabilities this is one fused SDPA call.

    On CPU the fused call runs in float32 whatever the autocast: at the decoder's sizes (32 queries, head dim 32, 32 to
    560 keys) CPU's bf16 SDPA is 1.5-6x slower than float32's, forward + backward (the backward above all: 2.6 ms
    against 0.4 ms for the self-attention, one thread), and float32 is the more exact of the two. The output comes
    back in q's dtype, as the bf16 call would have returned it. (The frozen ViT's attention, its own module with 141
    tokens of head dim 64, forward only, keeps bf16: 2.5 ms there against 3.6 ms in float32.)
    """
    if scale is None and not return_probs:
        if q.device.type != "cpu" or q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p), None
        with torch.autocast("cpu", enabled=False):
            mask = None if bias is None else bias.float()
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p)
        return out.to(q.dtype), None  # [B, h, Nq, d]
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, h, Nq, d] x [B, h, d, Nk] -> [B, h, Nq, Nk]
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    if scale is not None:
        probs = probs * scale
    out = F.dropout(probs, p=dropout_p) @ v  # [B, h, Nq, Nk] x [B, h, Nk, d] -> [B, h, Nq, d]
    return out, probs


class Attention(nn.Module):
    """Batch-first multi-head attention with separate q/k/v projections, an additive bias and a probability scale."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, N, C] -> [B, h, N, C/h]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        bias: Tensor | None = None,
        scale: Tensor | None = None,
        return_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """query [B, Nq, C], key/value [B, Nk, C], bias/scale broadcastable to [B, h, Nq, Nk] -> ([B, Nq, C], probs)."""
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        p = self.dropout if self.training else 0.0
        out, probs = attention(q, k, v, bias=bias, scale=scale, dropout_p=p, return_probs=return_probs)
        out = out.transpose(1, 2).flatten(2)  # [B, h, Nq, C/h] -> [B, Nq, C]
        return self.out_proj(out), probs


class FFN(nn.Module):
    """Transformer feed-forward block, post-norm (DETR / Mask2Former): norm(x + fc2(drop(relu(fc1(x)))))."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x))))))


def sine_position_encoding(
    shape: tuple[int, int, int], *, num_feats: int, device=None, dtype=torch.float32, temperature: float = 10000.0
) -> Tensor:
    """DETR's normalised sine encoding of a (B, H, W) grid -> [B, 2*num_feats, H, W] (y features, then x)."""
    B, H, W = shape
    eps, full = 1e-6, 2 * math.pi
    y = torch.arange(1, H + 1, device=device, dtype=torch.float32)[:, None].expand(H, W) / (H + eps) * full  # [H, W]
    x = torch.arange(1, W + 1, device=device, dtype=torch.float32)[None, :].expand(H, W) / (W + eps) * full  # [H, W]
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # [C/2]
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t  # [H, W, C/2]
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)  # [H, W, C/2]
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)  # [H, W, C/2]
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # [H, W, C] -> [C, H, W]
    return pos.to(dtype)[None].expand(B, -1, -1, -1)  # [B, C, H, W]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (ViTDet's simple feature pyramid)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # [B, H, W, C]
        return x.permute(0, 3, 1, 2)  # [B, C, H, W]


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises a bf16 channels-last map in the standard (contiguous) layout.

    The convolutions before it (oneDNN, fed the ViT's token map, which is channels-last) return channels-last maps,
    and PyTorch's CPU GroupNorm is slow on those in bf16: forward + backward of [4, 128, 40, 56] take 9.6 ms against
    1.3 ms contiguous (one thread). One copy to the standard layout costs a fraction of that: the FPN pixel decoder's
    forward + backward under bf16 autocast 130 -> 110 ms. The result is the same normalisation summed in another
    order (equal within rounding, tested). float32 maps keep their layout: there the contiguous maps slow the convs
    after the norm more than the norm gains, and the float32 step stays bit for bit what it was."""

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W] (contiguous when x is not float32)
        return super().forward(x if x.dtype == torch.float32 else x.contiguous())


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with Mask2Former's 32 groups, fewer when the width is not a multiple of 32 (tiny CPU configs)."""
    return GroupNorm(math.gcd(groups, channels), channels)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)
