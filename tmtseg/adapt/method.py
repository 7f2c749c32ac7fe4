"""Adaptation methods as small typed pieces composed into one pipeline (method.md §2, §6).

A method is the segmentation loss on the labelled batch plus pieces: domain alignment at image, patch or region level
(DANN, TVT-style, ACTE) and attention biasing (TVT-style, TMA), here; regularisers toward the source model (the KL,
L2-SP; regularisers.py) and which weights train (LoRA, a frozen ViT; models/tuning.py). `recipes.METHODS` names every
method by its pieces; `build_method` makes them from their config sections. `ModelWithLoss` = segmenter + method +
criterion: the one module that DDP wraps and that checkpoints hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg import dist
from tmtseg.adapt.acte import ACTE
from tmtseg.adapt.domain import Discriminator, binary_entropy_bits, domain_bce, grad_reverse, grl_coeff
from tmtseg.adapt.recipes import METHODS, regularisers_of, tuning_of
from tmtseg.adapt.regularisers import L2SP, PreserveKL
from tmtseg.adapt.tma import TMA, resize_map
from tmtseg.adapt.tuning import FrozenBackbone, LoRA
from tmtseg.losses.criterion import SetCriterion, semantic_targets


def make_targets(labels: Tensor, *, num_classes: int, ignore_index: int) -> list[dict]:
    """[B, H, W] semantic labels -> per-image set targets (labels, masks, valid)."""
    return [semantic_targets(lab, num_classes=num_classes, ignore_index=ignore_index) for lab in labels]


# ----------------------------------------------------------------------------------------------- domain alignment
# An alignment piece reads the segmenter's features through a hook and returns its outputs (the segmenter hands them
# back in `out["adapt"]`); `loss(labelled, unlabelled)` turns the two batches' outputs into its adversarial loss.
# Each piece is the discriminator module itself, so that the checkpoint keys stay `method.<name>.*`.


class ImageAlignment(Discriminator):
    """Image level (DANN; TVT's global term): one discriminator, behind a GRL, on the mean backbone token."""

    key = "image_logits"

    def pixel_features(self, features: dict, *, grl: Tensor | None) -> dict:
        if grl is None:
            return {}
        pooled = features["tokens"].mean(1)  # [B, N, C] -> [B, C]
        return {self.key: self(grad_reverse(pooled, grl))}  # [B]

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return domain_bce(labelled[self.key], labelled_is_source) + domain_bce(
            unlabelled[self.key], not labelled_is_source
        )


class PatchAlignment(Discriminator):
    """Patch level (TVT-style): a discriminator, behind a GRL, on each input token of the last ViT block."""

    key = "patch_logits"

    def backbone_tokens(self, tokens: Tensor, *, grl: Tensor | None) -> dict:
        x = tokens if grl is None else grad_reverse(tokens, grl)
        return {self.key: self(x)}  # [B, N, C] -> [B, N]

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return domain_bce(labelled[self.key], labelled_is_source) + domain_bce(
            unlabelled[self.key], not labelled_is_source
        )


class RegionAlignment(ACTE):
    """Region level (ACTE, method.md §4) on one pixel-decoder map; its map T(p) feeds TMA and the KL's weighting."""

    key = "acte"

    def __init__(self, *, feature_stride: int, features: str = "decoder", **acte):
        super().__init__(**acte)
        self.source = features
        self.feature_stride = 16 if features == "vit" else feature_stride
        self.level = {32: 0, 16: 1, 8: 2}[self.feature_stride]  # the decoder memory is ordered 1/32, 1/16, 1/8

    def feature_map(self, features: dict) -> Tensor:
        """The map ACTE clusters and discriminates [B, C, h, w], at stride feature_stride."""
        x = features["multi_scale"][self.level]  # [B, C, h, w]
        if self.source == "vit":  # the ViT's token map, on the stride-16 grid of the decoder's 1/16 map
            tokens, (h, w) = features["tokens"], features["tokens_hw"]
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # [B, N, C] -> [B, C, h, w]
            if (h, w) != tuple(x.shape[-2:]):
                grid = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = grid.to(x.dtype)
        return x

    def pixel_features(self, features: dict, *, grl: Tensor | None) -> dict:
        return {self.key: self(self.feature_map(features), grl_coeff=grl)}

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return ACTE.loss(labelled[self.key], labelled_is_source) + ACTE.loss(
            unlabelled[self.key], not labelled_is_source
        )

    def image_map(self, adapt: dict, hw: tuple[int, int]) -> Tensor:
        """T [B, 1, h', w'] cut to the image whose pred_masks grid is hw (the map covers the padded grid)."""
        s = self.feature_stride
        return adapt[self.key]["tmap"][..., : -(-hw[0] * 4 // s), : -(-hw[1] * 4 // s)]


# ------------------------------------------------------------------------------------------------ attention biasing


class PatchAttention(nn.Module):
    """TVT-style: the last ViT block's attention to each key re-weighted by that patch's transferability (binary
    entropy of the patch discriminator): the dense analogue of TVT's scaling of the class-token row."""

    at_inference = True
    reads = PatchAlignment.key  # the alignment piece whose outputs it needs, at inference too

    def __init__(self, *, eps: float):
        super().__init__()
        self.eps = eps

    def backbone_bias(self, adapt: dict) -> Tensor:
        t = binary_entropy_bits(torch.sigmoid(adapt[PatchAlignment.key].detach()))  # [B, N], 1 = transferable
        return torch.log(self.eps + t)[:, None, :]  # [B, 1, N]: an additive per-key bias


class TMAAttention(TMA):
    """TMA (method.md §5) on ACTE's map in every masked cross-attention of the decoder; with loss_weight (beta) the
    mask losses also weight each point by 1 + beta * W (an extension; beta = 0 is the paper's TMA)."""

    reads = RegionAlignment.key

    def __init__(self, *, at_inference: bool, loss_weight: float, **tma):
        super().__init__(**tma)
        self.at_inference, self.loss_weight = at_inference, loss_weight

    def decoder_attn(self, layer: int, prev: dict, hw: tuple[int, int], adapt: dict):  # noqa: ARG002
        return self.attn_terms(resize_map(adapt[RegionAlignment.key]["tmap"], hw), prev, hw)  # [B, 1, h, w] map

    def point_weight(self, tmap: Tensor, outputs: dict) -> Tensor:
        """1 + beta * W(p) [B, 1, h, w] on the final prediction's grid (tmap: T cut to the image)."""
        masks = outputs["pred_masks"]  # [B, Q, h, w], cropped to the image
        hw = tuple(masks.shape[-2:])
        prev = {"pred_logits": outputs["pred_logits"].detach(), "pred_masks": masks.detach()}
        return 1.0 + self.loss_weight * self.importance(tmap, prev, hw)


class Hooks:
    """The segmenter's hook points (models/segmenter.py) over a method's pieces, for one forward; grl=None at
    inference. It holds no state: what the pieces compute comes back in the segmenter's `adapt` output."""

    def __init__(self, *, align: list[nn.Module], attention: list[nn.Module], grl: Tensor | None):
        self.align, self.attention, self.grl = align, attention, grl
        pieces = [*align, *attention]
        # a hook point no piece uses is absent, so that the segmenter runs exactly as without hooks there
        if not any(hasattr(p, "backbone_tokens") or hasattr(p, "backbone_bias") for p in pieces):
            self.backbone_attn = None
        if not any(hasattr(p, "pixel_features") for p in pieces):
            self.pixel_features = None
        if not any(hasattr(p, "decoder_attn") for p in pieces):
            self.decoder_attn = None

    def backbone_attn(self, tokens: Tensor, hw: tuple[int, int]) -> tuple[Tensor | None, dict]:  # noqa: ARG002
        out: dict = {}
        for piece in self.align:
            if hasattr(piece, "backbone_tokens"):
                out.update(piece.backbone_tokens(tokens, grl=self.grl))
        biases = [a.backbone_bias(out) for a in self.attention if hasattr(a, "backbone_bias")]
        return (sum(biases[1:], biases[0]) if biases else None), out  # [B, 1 or h, N]

    def pixel_features(self, features: dict) -> dict:
        out: dict = {}
        for piece in self.align:
            if hasattr(piece, "pixel_features"):
                out.update(piece.pixel_features(features, grl=self.grl))
        return out

    def decoder_attn(self, layer: int, prev: dict, hw: tuple[int, int], adapt: dict):
        bias, scale = None, None  # several pieces: biases add, scales multiply
        for a in self.attention:
            if hasattr(a, "decoder_attn"):
                b, s = a.decoder_attn(layer, prev, hw, adapt)
                bias = b if bias is None or b is None else bias + b
                scale = s if scale is None or s is None else scale * s
        return bias, scale


# ----------------------------------------------------------------------------------------------------------- method


class Method(nn.Module):
    """The segmentation loss on the labelled batch + the method's pieces; `forward` returns the step's losses.

    batches: {"labelled": {image, label}, "unlabelled": {image}} (the unlabelled batch only where a piece needs it).
    The labelled batch is the target's (the source's in the unsupervised variant); `domains` names them for the KL's
    `images` choice. Pieces are registered under their names in `METHODS`, so checkpoint keys read method.<name>.*.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        ignore_index: int,
        unsupervised: bool,
        adv_weight: float,
        max_iter: int,
        align: dict[str, nn.Module],
        attention: dict[str, nn.Module],
        tuning: dict[str, nn.Module],
        regularisers: list[PreserveKL | L2SP],
    ):
        super().__init__()
        self.name, self.num_classes, self.ignore_index = name, num_classes, ignore_index
        self.labelled_is_source, self.adv_weight, self.max_iter = unsupervised, adv_weight, max_iter
        self.labelled_domain, self.unlabelled_domain = ("source", "target") if unsupervised else ("target", "source")
        for key, piece in {**align, **attention, **tuning}.items():
            self.add_module(key, piece)
        self.align, self.attention = list(align.values()), list(attention.values())
        self.tuning = list(tuning.values())
        self.regularisers = regularisers
        self.preserve = next((r for r in regularisers if isinstance(r, PreserveKL)), None)
        self.kl_on_unlabelled = self.preserve is not None and self.unlabelled_domain in self.preserve.domains
        self.needs_unlabelled = bool(self.align) or self.kl_on_unlabelled

    @property
    def wants_teacher(self) -> bool:
        """Whether a regulariser needs the frozen source model (`set_teacher`)."""
        return bool(self.regularisers)

    def set_teacher(self, model: nn.Module) -> None:
        """The frozen source model of the regularisers (the runner loads it from adapt.source_checkpoint)."""
        model.eval().requires_grad_(False)
        for r in self.regularisers:
            r.set_source(model)

    def attach(self, model: nn.Module) -> None:
        """Give the tuning pieces (LoRA, a frozen ViT) the segmenter: before the optimizer and DDP see it."""
        for piece in self.tuning:
            piece.attach(model)

    def hooks(self, *, grl: Tensor | None) -> Hooks | None:
        """The hook object of one forward (None = vanilla Mask2Former); grl=None means inference, where an attention
        piece runs if it says so (at_inference) and an alignment piece only if such a piece reads its outputs."""
        attention = [p for p in self.attention if grl is not None or p.at_inference]
        read = {p.reads for p in attention}
        align = [p for p in self.align if grl is not None or p.key in read]
        return Hooks(align=align, attention=attention, grl=grl) if align or attention else None

    def inference_hooks(self) -> Hooks | None:
        return self.hooks(grl=None)

    def transferability(self, adapt: dict, hw: tuple[int, int]) -> Tensor | None:
        """T(p) [B, 1, h, w] on the pred_masks grid of the image (None: no piece estimates one)."""
        for piece in self.align:
            if hasattr(piece, "image_map") and piece.key in adapt:
                return resize_map(piece.image_map(adapt, hw), hw).clamp(0.0, 1.0)
        return None

    def point_weight(self, outputs: dict) -> Tensor | None:
        """Per-pixel weights [B, 1, h, w] of the mask losses on the pred_masks grid (None = uniform)."""
        weighted = [a for a in self.attention if getattr(a, "loss_weight", 0.0)]
        region = next((p for p in self.align if hasattr(p, "image_map")), None)
        if not weighted or region is None or region.key not in outputs["adapt"]:
            return None
        tmap = region.image_map(outputs["adapt"], tuple(outputs["pred_masks"].shape[-2:]))
        return weighted[0].point_weight(tmap, outputs)

    def seg_loss(self, criterion: SetCriterion, batch: dict, outputs: dict) -> dict:
        targets = make_targets(batch["label"], num_classes=self.num_classes, ignore_index=self.ignore_index)
        num_masks = dist.all_reduce_mean(torch.tensor(float(criterion.num_masks(targets)))).clamp(min=1.0)
        return criterion(outputs, targets, num_masks=float(num_masks))

    def forward(self, model: nn.Module, criterion: SetCriterion, batches: dict[str, dict], *, step: int) -> dict:
        # a 0-d tensor, not a float: a compiled segmenter (train.compile) reads it as an input, where a new float at
        # every step would be a new constant and a recompile
        grl = torch.tensor(grl_coeff(step, self.max_iter), dtype=torch.float32)
        hooks = self.hooks(grl=grl)
        labelled = batches["labelled"]
        outputs = model(labelled["image"], hooks=hooks)
        weight = self.point_weight(outputs)
        if weight is not None:
            outputs = {**outputs, "point_weight": weight}
        losses = self.seg_loss(criterion, labelled, outputs)
        passes = {self.labelled_domain: (labelled["image"], outputs)}
        if "unlabelled" in batches and self.needs_unlabelled:
            images = batches["unlabelled"]["image"]
            if self.kl_on_unlabelled:  # the KL needs the decoder on that batch too
                other = model(images, hooks=self.hooks(grl=grl))
                passes[self.unlabelled_domain] = (images, other)
            else:
                other = model.encode(images, hooks=self.hooks(grl=grl))  # features only: what the discriminators see
            if self.align:
                adv = sum(
                    p.loss(outputs["adapt"], other["adapt"], labelled_is_source=self.labelled_is_source)
                    for p in self.align
                )
                losses["loss_adv"] = self.adv_weight * adv
                losses["loss"] = losses["loss"] + losses["loss_adv"]
        for reg in self.regularisers:
            if isinstance(reg, PreserveKL):
                losses[reg.name] = reg.loss(self, passes, student=model)
            else:
                losses[reg.name] = reg.loss(model, self)
            losses["loss"] = losses["loss"] + losses[reg.name]
        return losses


# ----------------------------------------------------------------------------------------------------- the builders


def _disc(cfg) -> dict:
    return dict(in_dim=cfg.model.backbone.embed_dim, hidden=cfg.adapt.disc.hidden, dropout=cfg.adapt.disc.dropout)


def _region(cfg) -> RegionAlignment:
    a = cfg.adapt
    return RegionAlignment(
        in_dim=cfg.model.backbone.embed_dim if a.acte.features == "vit" else cfg.model.conv_dim,
        feature_stride=a.acte.feature_stride,
        features=a.acte.features,
        cell=a.acte.cell,
        iters=a.acte.iters,
        kappa=a.acte.kappa,
        disc_hidden=a.disc.hidden,
        disc_dropout=a.disc.dropout,
    )


def _tma(cfg) -> TMAAttention:
    t = cfg.adapt.tma
    return TMAAttention(
        num_heads=cfg.model.nheads,
        alpha=t.alpha,
        combine=t.combine,
        uncertainty=t.uncertainty,
        form=t.form,
        learn_lambda=t.learn_lambda,
        lambda_init=t.lambda_init,
        eps=t.eps,
        normalize=t.normalize,
        at_inference=t.at_inference,
        loss_weight=t.loss_weight,
    )


def _preserve(cfg) -> PreserveKL:
    p = cfg.adapt.preserve
    domains = ("source", "target") if p.images == "both" else (p.images,)
    return PreserveKL(weight=p.weight, domains=domains, weighting=p.weighting)


class Builder(NamedTuple):
    make: Callable  # cfg -> the piece
    reads: tuple[str, ...]  # the adapt.* sections `make` reads: a run's identity (bench.config_hash) keeps only these


# Builders: plain functions in plain dicts, the only readers of their config sections.
ALIGN = {
    "image": Builder(lambda cfg: ImageAlignment(**_disc(cfg)), ("disc",)),
    "patch": Builder(lambda cfg: PatchAlignment(**_disc(cfg)), ("disc",)),
    "region": Builder(_region, ("acte", "disc")),
}
ATTENTION = {
    "patch": Builder(lambda cfg: PatchAttention(eps=cfg.adapt.tvt.eps), ("tvt",)),
    "tma": Builder(_tma, ("tma",)),
}
REGULARISERS = {"preserve": _preserve, "l2sp": lambda cfg: L2SP(alpha=cfg.adapt.l2sp.alpha, beta=cfg.adapt.l2sp.beta)}
TUNING = {
    "lora": lambda cfg: LoRA(rank=cfg.adapt.lora.rank, alpha=cfg.adapt.lora.alpha, targets=cfg.adapt.lora.targets),
    "frozen": lambda cfg: FrozenBackbone(),
}


def build_method(cfg) -> Method:
    """The method of cfg.adapt.method, its pieces built from their config sections."""
    a = cfg.adapt
    recipe = METHODS[a.method]
    return Method(
        name=a.method,
        num_classes=cfg.data.num_classes,
        ignore_index=cfg.data.ignore_index,
        unsupervised=a.unsupervised,
        adv_weight=a.adv_weight,
        max_iter=a.grl_max_iter or cfg.train.iters,
        align={name: ALIGN[kind].make(cfg) for name, kind in recipe.align},
        attention={name: ATTENTION[kind].make(cfg) for name, kind in recipe.attention},
        tuning={name: TUNING[kind](cfg) for name, kind in tuning_of(a)},
        regularisers=[REGULARISERS[kind](cfg) for kind in regularisers_of(a)],
    )


# every adapt.* section some alignment or attention piece reads
PIECE_SECTIONS = frozenset(s for b in (*ALIGN.values(), *ATTENTION.values()) for s in b.reads)


def piece_sections(recipe) -> set[str]:
    """The adapt.* sections that the alignment and attention pieces of a method (a recipes.Recipe) read."""
    return {s for _, kind in recipe.align for s in ALIGN[kind].reads} | {
        s for _, kind in recipe.attention for s in ATTENTION[kind].reads
    }


class ModelWithLoss(nn.Module):
    """Segmenter + adaptation method + criterion; `forward(batches, step)` returns the step's losses.

    Its state dict holds the segmenter as a plain Segmenter loads it: with LoRA, the update merged into the weights."""

    def __init__(self, *, model: nn.Module, method: Method, criterion: SetCriterion):
        super().__init__()
        self.model, self.method, self.criterion = model, method, criterion
        method.attach(model)
        lora = [p for p in method.tuning if isinstance(p, LoRA)]
        if lora:
            self.register_state_dict_post_hook(lambda m, state, prefix, meta: lora[0].merged_state(state, prefix))
            self.register_load_state_dict_pre_hook(lambda m, state, prefix, *_: lora[0].unmerge_state(state, prefix))

    def forward(self, batches: dict[str, dict], *, step: int) -> dict:
        return self.method(self.model, self.criterion, batches, step=step)


def build_model_with_loss(cfg, *, pretrained: bool = True) -> ModelWithLoss:
    """The trainer of cfg.adapt.method; `pretrained=False` skips loading the ViT's pretrained weights (a checkpoint
    is about to replace them)."""
    from tmtseg.modeling.build import build_criterion, build_model

    return ModelWithLoss(
        model=build_model(cfg, pretrained=pretrained), method=build_method(cfg), criterion=build_criterion(cfg)
    )
