"""Builders: the only readers of the config for the segmenter (method.md §3) and its criterion."""

from __future__ import annotations

from torch import nn

from ..config import Config
from ..errors import ConfigError
from .backbone import SimpleFeaturePyramid, VisionTransformer, ViTBackbone, load_pretrained
from .criterion import SetCriterion
from .mask_decoder import MaskedAttentionDecoder
from .matcher import HungarianMatcher
from .pixel_decoder import FPNPixelDecoder, MSDeformPixelDecoder
from .segmenter import SIZE_DIVISOR, Segmenter


def _fpn(cfg: Config) -> nn.Module:
    m = cfg.model
    return FPNPixelDecoder(in_dim=m.conv_dim, conv_dim=m.conv_dim, mask_dim=m.mask_dim)


def _msdeform(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.conv_dim % m.nheads or (m.conv_dim // m.nheads) % 2:
        raise ConfigError(f"config key model.conv_dim={m.conv_dim}: msdeform needs an even width per head (nheads)")
    return MSDeformPixelDecoder(
        in_dim=m.conv_dim,
        conv_dim=m.conv_dim,
        mask_dim=m.mask_dim,
        num_layers=m.enc_layers,
        num_heads=m.nheads,
        ffn_dim=m.dim_feedforward,
        dropout=m.dropout,
    )


PIXEL_DECODERS = {"fpn": _fpn, "msdeform": _msdeform}


def build_backbone(cfg: Config) -> ViTBackbone:
    b = cfg.model.backbone
    p = b.patch_size
    if p < 1 or p & (p - 1) or SIZE_DIVISOR % p:
        raise ConfigError(f"config key model.backbone.patch_size={p}: must be a power of two dividing {SIZE_DIVISOR}")
    if b.embed_dim % max(p // 4, 1):  # the stride-4 level halves the width log2(p/4) times
        raise ConfigError(f"config key model.backbone.embed_dim={b.embed_dim}: must be divisible by patch_size/4")
    vit = VisionTransformer(
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        patch_size=p,
        mlp_ratio=b.mlp_ratio,
        drop_path=b.drop_path,
        img_size=b.img_size,
    )
    if b.pretrained:
        load_pretrained(vit, b.pretrained)
    pyramid = SimpleFeaturePyramid(in_dim=b.embed_dim, out_dim=cfg.model.conv_dim, patch_size=p)
    return ViTBackbone(vit=vit, pyramid=pyramid)


def build_model(cfg: Config) -> Segmenter:
    """Segmenter from cfg.model and cfg.data.num_classes (pretrained ViT weights loaded if configured)."""
    m = cfg.model
    if m.conv_dim % 2 or m.hidden_dim % 2:
        raise ConfigError("config keys model.conv_dim and model.hidden_dim must be even (sine position encoding)")
    decoder = MaskedAttentionDecoder(
        in_dim=m.conv_dim,
        hidden_dim=m.hidden_dim,
        mask_dim=m.mask_dim,
        num_classes=cfg.data.num_classes,
        num_queries=m.num_queries,
        num_heads=m.nheads,
        num_layers=m.dec_layers,
        ffn_dim=m.dim_feedforward,
        dropout=m.dropout,
    )
    return Segmenter(
        backbone=build_backbone(cfg),
        pixel_decoder=PIXEL_DECODERS[m.pixel_decoder](cfg),
        decoder=decoder,
        pixel_mean=m.pixel_mean,
        pixel_std=m.pixel_std,
    )


def build_criterion(cfg: Config) -> SetCriterion:
    """SetCriterion from cfg.loss and cfg.data.num_classes; the matcher uses the loss weights as its cost weights."""
    lo = cfg.loss
    if not 0.0 <= lo.importance_sample_ratio <= 1.0 or lo.oversample_ratio < 1.0:
        raise ConfigError("config keys loss.importance_sample_ratio in [0, 1] and loss.oversample_ratio >= 1")
    matcher = HungarianMatcher(
        cost_class=lo.class_weight, cost_mask=lo.mask_weight, cost_dice=lo.dice_weight, num_points=lo.num_points
    )
    return SetCriterion(
        num_classes=cfg.data.num_classes,
        matcher=matcher,
        class_weight=lo.class_weight,
        mask_weight=lo.mask_weight,
        dice_weight=lo.dice_weight,
        no_object_weight=lo.no_object_weight,
        num_points=lo.num_points,
        oversample_ratio=lo.oversample_ratio,
        importance_sample_ratio=lo.importance_sample_ratio,
        deep_supervision=lo.deep_supervision,
    )
