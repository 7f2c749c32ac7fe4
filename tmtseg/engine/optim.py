"""The optimizer side of training: which weights train (train.freeze_blocks), their learning rates (per-part
multipliers, BEiT's layer decay) and weight decay."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tmtseg.adapt.build import ModelWithLoss
    from tmtseg.config import Config

_NO_DECAY = ("pos_embed", "cls_token", "query_feat", "query_embed", "level_embed")


def lr_mult(cfg: Config, name: str) -> float:
    """The lr multiplier of a trainer parameter: the pretrained ViT's (backbone_lr_mult, times layer_decay to the
    power of its distance from the top), the adaptation method's fresh modules' (its discriminators start from
    scratch while the segmenter is only nudged), and TMA's lambda. The feature pyramid starts fresh: lr x 1."""
    if name.startswith("model.backbone.vit."):
        level = vit_depth_from_top(cfg.model.backbone.depth, name.removeprefix("model.backbone.vit."))
        return cfg.train.backbone_lr_mult * cfg.train.layer_decay**level
    if name in ("method.tma.lambdas", "method.tma_vit.lambdas"):
        return cfg.adapt.tma.lambda_lr_mult
    if name.startswith("method."):
        return cfg.adapt.head_lr_mult
    return 1.0


def vit_depth_from_top(depth: int, rest: str) -> int:
    """A ViT parameter's (name inside the ViT) distance from the top: 0 for the final norm, n - i for block i of n,
    n + 1 for the embeddings and prefix tokens (BEiT's layer decay)."""
    if rest.startswith("blocks."):
        return depth - int(rest.split(".")[1])
    return 0 if rest.startswith("norm.") else depth + 1


def freeze(cfg: Config, trainer: ModelWithLoss) -> None:
    """train.freeze_blocks: the patch embedding, position table, prefix tokens and the first N ViT blocks (-1: the
    whole ViT) get requires_grad False; the optimizer then skips them and DDP ignores them."""
    n = cfg.train.freeze_blocks
    if n == 0:
        return
    depth = cfg.model.backbone.depth
    for name, p in trainer.model.backbone.vit.named_parameters():
        level = vit_depth_from_top(depth, name)  # depth + 1 for the embeddings
        if n == -1 or depth - level < n:
            p.requires_grad_(False)


def build_optimizer(cfg: Config, trainer: ModelWithLoss) -> torch.optim.Optimizer:
    """AdamW with per-part lr multipliers (`lr_mult`); no weight decay on norms, biases, embeddings, lambda.

    The fused implementation (one kernel over every tensor of a group, CPU and CUDA): on the CPU torch's default is
    the per-tensor loop, ~5x slower for the decoders' few hundred tensors (benchmarks/README.md, speed_step.py); the
    two agree to float rounding (6e-8 after 20 steps on unit-scale weights)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in trainer.named_parameters():
        if not p.requires_grad:
            continue
        mult = lr_mult(cfg, name)
        no_decay = p.ndim <= 1 or any(t in name for t in _NO_DECAY)
        groups.setdefault((mult, 0.0 if no_decay else cfg.train.weight_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": cfg.train.lr * m, "initial_lr": cfg.train.lr * m, "weight_decay": wd}
        for (m, wd), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, fused=True)
