"""Builders of the segmenter (docs/method.md §3) and its criterion: the only readers of the config on the modeling
side, and the tables of its extension points (BACKBONES, PIXEL_DECODERS: a name -> a builder taking the config)."""

from __future__ import annotations

import sys

from torch import nn

from tmtseg.errors import ConfigError
from tmtseg.losses.criterion import SetCriterion
from tmtseg.losses.matcher import HungarianMatcher
from tmtseg.modeling.backbones.vit import SimpleFeaturePyramid, VisionTransformer, ViTBackbone
from tmtseg.modeling.backbones.vit_checkpoint import load_pretrained
from tmtseg.modeling.mask_decoder import MaskedAttentionDecoder
from tmtseg.modeling.pixel_decoders.decoders import FPNPixelDecoder, MSDeformPixelDecoder
from tmtseg.modeling.segmenter import Segmenter
from tmtseg.registry import Registry

# The builders read the config object (tmtseg.config.Config) they are handed, without importing its module: the config
# sits above these tables, whose names it validates.


def _fpn(cfg) -> nn.Module:
    m = cfg.model
    return FPNPixelDecoder(in_dim=m.conv_dim, conv_dim=m.conv_dim, mask_dim=m.mask_dim)


def _msdeform(cfg) -> nn.Module:
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


PIXEL_DECODERS: Registry = Registry("pixel decoder", {"fpn": _fpn, "msdeform": _msdeform})


def build_vit(cfg, *, pretrained: bool = True) -> ViTBackbone:
    """ViT + pyramid from cfg.model.backbone; with `pretrained` (and a name or path configured) the ViT weights are
    loaded, fetching a known name into the cache on first use. Models about to receive a checkpoint skip that."""
    b = cfg.model.backbone
    stride = b.token_stride or b.patch_size  # validated: a power of two in 4..32
    vit = VisionTransformer(
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        patch_size=b.patch_size,
        mlp_ratio=b.mlp_ratio,
        drop_path=b.drop_path,
        img_size=b.img_size,
        layerscale=b.layerscale,
        num_registers=b.num_registers,
        pos_offset=b.pos_offset,
        pos_antialias=b.pos_antialias,
    )
    if pretrained and b.pretrained:
        from tmtseg.modeling.backbones.weights import resolve

        load_pretrained(vit, resolve(b.pretrained, log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    pyramid = SimpleFeaturePyramid(in_dim=b.embed_dim, out_dim=cfg.model.conv_dim, in_stride=stride)
    return ViTBackbone(vit=vit, pyramid=pyramid, token_stride=stride, fit=b.fit)


# a backbone builder returns a module with `kind` ("vit": tokens + a pyramid built from them; "hierarchical": its own
# multi-scale maps) and forward(x, attn_hook=, vit_tokens=) -> {tokens, tokens_hw, pyramid {stride: map}}
BACKBONES: Registry = Registry("backbone", {"vit": build_vit})


def build_backbone(cfg, *, pretrained: bool = True) -> nn.Module:
    """The backbone of cfg.model.backbone.name from the BACKBONES table."""
    return BACKBONES.lookup(cfg.model.backbone.name, key="model.backbone.name")(cfg, pretrained=pretrained)


def build_model(cfg, *, pretrained: bool = True) -> Segmenter:
    """Segmenter from cfg.model and cfg.data.num_classes (pretrained ViT weights loaded if configured and
    `pretrained`: pass False when a checkpoint's weights replace them anyway)."""
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
        backbone=build_backbone(cfg, pretrained=pretrained),
        pixel_decoder=PIXEL_DECODERS.lookup(m.pixel_decoder, key="model.pixel_decoder")(cfg),
        decoder=decoder,
        pixel_mean=m.pixel_mean,
        pixel_std=m.pixel_std,
    )


def build_criterion(cfg) -> SetCriterion:
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
