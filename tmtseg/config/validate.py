"""The one validation pass over a loaded config: values that types alone do not catch, each error naming its key.
The core sections' bounds are the tables below; a piece's section declares its own (tmtseg/settings.py), and names
are checked against the extension tables they select from."""

from __future__ import annotations

import dataclasses
from typing import Any

from tmtseg.adapt.registry import METHODS, SECTIONS
from tmtseg.config.schema import Config
from tmtseg.errors import ConfigError
from tmtseg.modeling.backbones.pretrained import check_arch
from tmtseg.modeling.build import BACKBONES, PIXEL_DECODERS
from tmtseg.settings import check_number, check_settings

_CHOICES = {
    "data.train.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "data.val.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "data.source.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "model.backbone.fit": ("resize_input", "resize_tokens"),
    "train.amp": ("none", "bf16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nonfinite": ("stop", "skip"),
    "infer.mode": ("whole", "slide"),
}


# numeric ranges, checked before anything is built: a value outside them would crash (or silently misbehave) later,
# after data loading or a wasted training step. (low, high, what): bounds inclusive, None = unbounded; ">0" keys
# exclude 0
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.num_classes": (1, None),
    "data.batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.color_jitter": (0, 1),
    "data.max_ignore_share": (0, 1),
    "model.backbone.embed_dim": (1, None),
    "model.backbone.depth": (1, None),
    "model.backbone.num_heads": (1, None),
    "model.backbone.patch_size": (1, None),
    "model.backbone.mlp_ratio": (0, None),
    "model.backbone.drop_path": (0, 1),
    "model.backbone.img_size": (1, None),
    "model.backbone.layerscale": (0, None),
    "model.backbone.num_registers": (0, None),
    "model.backbone.pos_offset": (0, 1),
    "model.backbone.token_stride": (0, None),
    "model.conv_dim": (1, None),
    "model.mask_dim": (1, None),
    "model.enc_layers": (0, None),
    "model.hidden_dim": (1, None),
    "model.num_queries": (1, None),
    "model.nheads": (1, None),
    "model.dec_layers": (1, None),
    "model.dim_feedforward": (1, None),
    "model.dropout": (0, 1),
    "loss.class_weight": (0, None),
    "loss.mask_weight": (0, None),
    "loss.dice_weight": (0, None),
    "loss.no_object_weight": (0, None),
    "loss.num_points": (1, None),
    "loss.oversample_ratio": (1, None),
    "loss.importance_sample_ratio": (0, 1),
    "train.iters": (1, None),
    "train.lr": (0, None),
    "train.backbone_lr_mult": (0, None),
    "train.layer_decay": (0, 1),
    "train.weight_decay": (0, None),
    "train.warmup_iters": (0, None),
    "train.poly_power": (0, None),
    "train.grad_clip": (0, None),
    "train.log_every": (1, None),
    "train.eval_every": (0, None),
    "train.save_every": (1, None),
    "train.keep_last": (0, None),
    "train.max_skipped_frac": (0, 1),
    "adapt.adv_weight": (0, None),
    "adapt.head_lr_mult": (0, None),
    "adapt.grl_max_iter": (0, None),
}
# ... and of these, 0 itself is refused too (a zero learning rate trains nothing; a zero scale has no pixels)
_POSITIVE = {
    "train.lr",
    "train.layer_decay",
    "data.scale",
    "model.backbone.mlp_ratio",
}


def _check_range(key: str, value: float, low: float | None, high: float | None) -> None:
    check_number(key, value, low, high, positive=key in _POSITIVE)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Check values that types alone do not catch; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(map(str, choices))}")
    for key, (low, high) in _RANGES.items():
        _check_range(key, _get(cfg, key), low, high)
    _check_range("data.scale", cfg.data.scale, None, None)
    for key in ("data.crop_size", "data.scale_range", "infer.stride", "model.pixel_mean", "model.pixel_std"):
        for value in _get(cfg, key):
            _check_range(key, value, None, None)
    if len(cfg.infer.stride) != 2 or min(cfg.infer.stride) < 1:
        raise ConfigError(f"config key infer.stride={cfg.infer.stride}: two steps [H, W], each >= 1")
    if len(cfg.model.pixel_mean) != 3 or len(cfg.model.pixel_std) != 3 or min(cfg.model.pixel_std) <= 0:
        raise ConfigError("config keys model.pixel_mean, model.pixel_std: three values each, std > 0")
    _validate_tables(cfg)
    if cfg.data.num_classes < 1:
        raise ConfigError(f"config key data.num_classes={cfg.data.num_classes}: must be >= 1")
    if cfg.data.class_names and len(cfg.data.class_names) != cfg.data.num_classes:
        raise ConfigError(
            f"config key data.class_names: {len(cfg.data.class_names)} names"
            f" for data.num_classes={cfg.data.num_classes}"
        )
    if len(cfg.data.crop_size) != 2 or min(cfg.data.crop_size) < 32:
        raise ConfigError(f"config key data.crop_size={cfg.data.crop_size}: two sizes [H, W], each >= 32")
    if len(cfg.data.scale_range) != 2 or not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise ConfigError(f"config key data.scale_range={cfg.data.scale_range}: [low, high] with 0 < low <= high")
    if cfg.data.scale <= 0:
        raise ConfigError(f"config key data.scale={cfg.data.scale}: must be > 0")
    for name in ("train", "val", "source"):
        if (split_scale := getattr(cfg.data, name).scale) < 0:
            raise ConfigError(f"config key data.{name}.scale={split_scale}: must be >= 0 (0 = data.scale)")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"config key data.batch_size={cfg.data.batch_size}: must be >= 1")
    if cfg.model.hidden_dim % cfg.model.nheads:
        raise ConfigError(f"config key model.nheads={cfg.model.nheads}: must divide model.hidden_dim")
    b = cfg.model.backbone
    if b.embed_dim % b.num_heads:
        raise ConfigError("config key model.backbone.num_heads: must divide model.backbone.embed_dim")
    stride = b.token_stride or b.patch_size
    if stride not in (4, 8, 16, 32):
        raise ConfigError(
            f"config key model.backbone.token_stride={b.token_stride}: the pyramid starts from a power of two in"
            f" 4..32 (patch_size={b.patch_size}; with patch 14 set token_stride: 16)"
        )
    if b.embed_dim % max(stride // 4, 1):  # the stride-4 level halves the width log2(stride/4) times
        raise ConfigError(f"config key model.backbone.embed_dim={b.embed_dim}: must be divisible by token_stride/4")
    if not -1 <= cfg.train.freeze_blocks <= b.depth:
        raise ConfigError(f"config key train.freeze_blocks={cfg.train.freeze_blocks}: must be in [-1, {b.depth}]")
    if bad := check_arch(b.pretrained, dataclasses.asdict(b)):
        raise ConfigError(f"config key {bad[0]}; set the architecture of the pretrained weights")
    if cfg.train.iters < 1:
        raise ConfigError(f"config key train.iters={cfg.train.iters}: must be >= 1")
    return cfg


def _validate_tables(cfg: Config) -> None:
    """Names that select from an extension table, and each piece's settings against the bounds it declares."""
    METHODS.lookup(cfg.adapt.method, key="adapt.method")
    BACKBONES.lookup(cfg.model.backbone.name, key="model.backbone.name")
    PIXEL_DECODERS.lookup(cfg.model.pixel_decoder, key="model.pixel_decoder")
    for name in SECTIONS:
        section = getattr(cfg.adapt, name)
        check_settings(f"adapt.{name}", section)
        bad = [m for m in getattr(section, "methods", []) if m not in METHODS]  # "give this term to these methods"
        if bad:
            raise ConfigError(f"config key adapt.{name}.methods: {bad} not among {', '.join(METHODS)}")
