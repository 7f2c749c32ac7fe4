"""Mask2Former's masked-attention transformer decoder (docs/method.md §3): learnable queries that cross-attend,
round-robin over the 1/32, 1/16, 1/8 memory, only inside the previous layer's predicted masks; class and mask heads."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.modeling.layers import FFN, MLP, Attention, sine_position_encoding

# hook(layer, prev dict(pred_logits, pred_masks), (h, w)) -> (bias [B, h, h*w] | None, scale [B, h, h*w] | None)
DecoderHook = Callable[[int, dict, tuple[int, int]], tuple[Tensor | None, Tensor | None]]


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each post-norm with a residual (Mask2Former)."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = Attention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim=dim, hidden_dim=ffn_dim, dropout=dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        query_pos: Tensor,
        memory_pos: Tensor,
        bias: Tensor,
        scale: Tensor | None = None,
        return_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """tgt, query_pos [B, Q, C]; memory, memory_pos [B, N, C]; bias, scale [B, 1|h, Q, N] -> ([B, Q, C], probs)."""
        out, probs = self.cross_attn(
            tgt + query_pos, memory + memory_pos, memory, bias=bias, scale=scale, return_probs=return_probs
        )
        tgt = self.norm1(tgt + self.dropout(out))
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, q, tgt)[0]))
        return self.ffn(tgt), probs


class MaskedAttentionDecoder(nn.Module):
    """Queries -> one prediction before the first layer and one after each layer (Mask2Former's decoder)."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dim: int,
        mask_dim: int,
        num_classes: int,
        num_queries: int,
        num_heads: int,
        num_layers: int,
        ffn_dim: int,
        dropout: float = 0.0,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_heads, self.num_levels = num_classes, num_heads, num_levels
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1) if in_dim != hidden_dim else nn.Identity()
            for _ in range(num_levels)
        )
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # the queries' content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # the queries' positional part
        self.layers = nn.ModuleList(
            DecoderLayer(dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def predict(self, tgt: Tensor, mask_features: Tensor) -> dict[str, Tensor]:
        """Heads on the normalised queries: class logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4]."""
        out = self.decoder_norm(tgt)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)  # [B, Q, H/4, W/4]
        return {"pred_logits": self.class_embed(out), "pred_masks": masks}

    def _mask_inputs(
        self, mask_features: Tensor, sizes: list[tuple[int, int]], all_predictions: bool
    ) -> Callable[[int], Tensor]:
        """prediction index j (0: before the first layer, j: after layer j) -> the mask features its masks are made
        from: [B, Cm, H/4, W/4], or on the fast path [B, Cm, h, w] at the memory size of the layer it feeds (each
        level resized once; the last prediction, which feeds no layer, at H/4 x W/4)."""
        if all_predictions:
            return lambda j: mask_features
        resized = [
            F.interpolate(mask_features, size=hw, mode="bilinear", align_corners=False)  # [B, Cm, h, w]
            for hw in sizes[: min(self.num_levels, len(self.layers))]
        ]
        return lambda j: mask_features if j == len(self.layers) else resized[j % self.num_levels]

    @staticmethod
    def attention_mask(pred_masks: Tensor, hw: tuple[int, int]) -> Tensor:
        """True = masked out: the previous mask at the memory size has sigmoid < 0.5; empty rows attend everywhere."""
        m = pred_masks.detach()
        if tuple(m.shape[-2:]) != tuple(hw):  # the fast path predicts at hw already (a same-size resize is identity)
            m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False)  # [B, Q, h, w]
        mask = m.flatten(2).sigmoid() < 0.5  # [B, Q, h*w]
        return mask & ~mask.all(dim=-1, keepdim=True)

    def forward(
        self,
        multi_scale: list[Tensor],
        mask_features: Tensor,
        *,
        attn_hook: DecoderHook | None = None,
        return_attn: bool = False,
        all_predictions: bool = True,
    ) -> dict:
        """multi_scale: [B, Cd, h, w] maps at strides 32, 16, 8; mask_features [B, Cm, H/4, W/4].

        Returns predictions (list of dicts pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4], one before the first
        layer and one per layer) and, if return_attn, attn [B, h, Q, N], attn_masks bool [B, Q, N], attn_hw per layer.

        all_predictions=False is the inference fast path: predictions holds the last layer's only, and each earlier
        prediction, which only makes the next layer's attention mask (and the hook's `prev`), is computed at that
        layer's memory size hw from the mask features resized to hw, instead of at H/4 x W/4 and then resized. Both
        resizes are bilinear, linear per channel, and the mask head is a sum over channels, so the two orders agree
        up to float rounding (tests/test_deploy.py: within 1e-5), at 1/4 to 1/64 of the einsum's cost per layer.
        """
        memory, memory_pos, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            B, _, h, w = x.shape
            sizes.append((h, w))
            x = self.input_proj[lvl](x)  # [B, C, h, w]
            pos = sine_position_encoding((B, h, w), num_feats=x.shape[1] // 2, device=x.device, dtype=x.dtype)
            memory_pos.append(pos.flatten(2).transpose(1, 2))  # [B, h*w, C]
            memory.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl])  # [B, h*w, C]
        B = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # [B, Q, C]
        tgt = self.query_feat.weight[None].expand(B, -1, -1)  # [B, Q, C]
        heads_on = self._mask_inputs(mask_features, sizes, all_predictions)
        pred = self.predict(tgt, heads_on(0))
        predictions, attn, attn_masks, attn_hw = [pred] if all_predictions or not self.layers else [], [], [], []
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            hw = sizes[lvl]
            mask = self.attention_mask(pred["pred_masks"], hw)  # [B, Q, h*w]
            bias = torch.zeros(mask.shape, dtype=tgt.dtype, device=tgt.device).masked_fill(mask, float("-inf"))
            bias = bias[:, None]  # [B, 1, Q, h*w]
            scale = None
            if attn_hook is not None:
                prev = {k: v.detach() for k, v in pred.items()}
                extra, scale = attn_hook(i, prev, hw)
                if extra is not None:
                    bias = bias + extra.to(bias.dtype)[:, :, None, :]  # -inf stays -inf; [B, h, Q, h*w]
                if scale is not None:
                    scale = scale.to(bias.dtype)[:, :, None, :]  # [B, h, 1, h*w]
            tgt, probs = layer(
                tgt,
                memory[lvl],
                query_pos=query_pos,
                memory_pos=memory_pos[lvl],
                bias=bias,
                scale=scale,
                return_probs=return_attn,
            )
            pred = self.predict(tgt, heads_on(i + 1))
            if all_predictions or i == len(self.layers) - 1:
                predictions.append(pred)
            if return_attn:
                attn.append(probs)
                attn_masks.append(mask)
                attn_hw.append(hw)
        out = {"predictions": predictions}
        if return_attn:
            out.update(attn=attn, attn_masks=attn_masks, attn_hw=attn_hw)
        return out
