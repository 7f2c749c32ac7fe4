"""Adaptation methods as small pieces composed into one pipeline (method.md §2, §6).

A method turns a step's batches into losses. `finetune` is the plain segmentation loss (also how source models are
trained); the adversarial methods add discriminators and attention hooks. `Trainer` = segmenter + method + criterion:
the one module that DDP wraps and that checkpoints hold.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dist
from .models.acte import ACTE
from .models.criterion import SetCriterion, semantic_targets
from .models.domain import Discriminator, binary_entropy_bits, domain_bce, grad_reverse, grl_coeff
from .models.inference import semantic_probs
from .models.tma import TMA, resize_map


def class_distribution(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel class distribution [B, K, h, w] (float32, sums to 1 over K) of a mask-classification output."""
    probs = semantic_probs(pred_logits.float(), pred_masks.float())  # [B, K, h, w]
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-8)


def make_targets(labels: torch.Tensor, *, num_classes: int, ignore_index: int) -> list[dict]:
    """[B, H, W] semantic labels -> per-image set targets (labels, masks, valid)."""
    return [semantic_targets(lab, num_classes=num_classes, ignore_index=ignore_index) for lab in labels]


class Finetune(nn.Module):
    """The plain segmentation loss on the labelled batch: vanilla fine-tuning, and supervised source training.

    Subclasses add a domain-adversarial term: `hooks()` makes the per-forward hook object that records what the
    discriminators need (and supplies attention terms), `domain_loss()` turns two such records into a loss. Any method
    may add the preservation term (`preserve`: a KL to the frozen source model set by `set_teacher`, per pixel weighted
    by `transferability()` where the method estimates one); build_method gives it to the methods adapt.preserve lists.
    """

    name = "finetune"
    needs_source = False

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int,
        unsupervised: bool = False,
        adv_weight: float = 0.0,
        max_iter: int = 1,
        preserve: dict | None = None,
    ):
        super().__init__()
        self.num_classes, self.ignore_index, self.unsupervised = num_classes, ignore_index, unsupervised
        self.adv_weight, self.max_iter = adv_weight, max_iter
        preserve = {"weight": 0.0, "images": "source", "weighting": "transferability", **(preserve or {})}
        self.preserve_weight = float(preserve["weight"])
        images = preserve["images"]
        self.preserve_on = ("source", "target") if images == "both" else (images,)
        self.preserve_weighting = preserve["weighting"]
        self.needs_source = type(self).needs_source or (self.wants_teacher and "source" in self.preserve_on)
        self._teacher: tuple[nn.Module, ...] = ()  # in a tuple: not a submodule, so never trained, saved or wrapped

    @property
    def wants_teacher(self) -> bool:
        """Whether the method needs the frozen source model (`set_teacher`) for the preservation term."""
        return self.preserve_weight > 0

    def set_teacher(self, model: nn.Module) -> None:
        """The frozen source model of the preservation term (the runner loads it from adapt.source_checkpoint)."""
        model.eval().requires_grad_(False)
        self._teacher = (model,)

    def seg_loss(self, criterion: SetCriterion, batch: dict, outputs: dict) -> dict:
        targets = make_targets(batch["label"], num_classes=self.num_classes, ignore_index=self.ignore_index)
        num_masks = dist.all_reduce_mean(torch.tensor(float(criterion.num_masks(targets)))).clamp(min=1.0)
        return criterion(outputs, targets, num_masks=float(num_masks))

    def hooks(self, *, grl: float | None):  # noqa: ARG002
        """The hook object of one forward (None = vanilla Mask2Former); grl=None means inference."""
        return None

    def inference_hooks(self):
        return self.hooks(grl=None)

    def point_weight(self, hooks, outputs: dict) -> torch.Tensor | None:  # noqa: ARG002
        """Per-pixel weights [B, 1, h, w] of the mask losses on the pred_masks grid (None = uniform)."""
        return None

    def domain_loss(self, labelled: object, other: object, *, labelled_is_source: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model: nn.Module, criterion: SetCriterion, batches: dict[str, dict], *, step: int) -> dict:
        # the labelled batch is the target's; in the unsupervised variant it is the source's
        labelled_key, other_key = ("source", "target") if self.unsupervised else ("target", "source")
        grl = grl_coeff(step, self.max_iter)
        hooks = self.hooks(grl=grl)
        outputs = model(batches[labelled_key]["image"], hooks=hooks)
        weight = self.point_weight(hooks, outputs)
        if weight is not None:
            outputs = {**outputs, "point_weight": weight}
        losses = self.seg_loss(criterion, batches[labelled_key], outputs)
        passes = {labelled_key: (outputs, hooks)}
        preserve_other = self.wants_teacher and other_key in self.preserve_on  # needs the decoder on that batch too
        if other_key in batches and (hooks is not None or preserve_other):
            other = self.hooks(grl=grl)
            if preserve_other:
                passes[other_key] = (model(batches[other_key]["image"], hooks=other), other)
            else:
                model.encode(batches[other_key]["image"], hooks=other)  # features only: the decoder is not needed
            if hooks is not None:
                adv = self.domain_loss(hooks, other, labelled_is_source=self.unsupervised)
                losses["loss_adv"] = self.adv_weight * adv
                losses["loss"] = losses["loss"] + losses["loss_adv"]
        if self.wants_teacher:
            terms = [self.preserve_loss(batches[k]["image"], *passes[k]) for k in self.preserve_on if k in passes]
            losses["loss_preserve"] = self.preserve_weight * sum(terms) / max(len(terms), 1)
            losses["loss"] = losses["loss"] + losses["loss_preserve"]
        return losses

    def transferability(self, hooks, hw: tuple[int, int]) -> torch.Tensor | None:  # noqa: ARG002
        """T(p) [B, 1, h, w] on the pred_masks grid of the image (None: the method estimates none)."""
        return None

    def preserve_loss(self, images: torch.Tensor, outputs: dict, hooks) -> torch.Tensor:
        """KL(source model || adapted model) of the per-pixel class distributions on the pred_masks grid, averaged
        over pixels with weight T(p) (or uniformly)."""
        if not self._teacher:
            raise RuntimeError("preserve: set_teacher() was not called (the runner loads the source model)")
        with torch.no_grad():
            teacher = self._teacher[0](images)
            p_t = class_distribution(teacher["pred_logits"], teacher["pred_masks"])  # [B, K, h, w]
        p_s = class_distribution(outputs["pred_logits"], outputs["pred_masks"])  # [B, K, h, w]
        kl = (torch.special.xlogy(p_t, p_t) - p_t * torch.log(p_s.clamp_min(1e-8))).sum(1, keepdim=True)  # [B, 1, h, w]
        w = self.transferability(hooks, kl.shape[-2:]) if self.preserve_weighting == "transferability" else None
        if w is None:
            return kl.mean()
        w = w.detach().to(kl.dtype)
        return (kl * w).sum() / w.sum().clamp_min(1e-6)


class _Record:
    """What one forward leaves for the discriminators; also the hook object the segmenter calls."""

    def __init__(self, method: nn.Module, grl: float | None):
        self.method, self.grl, self.store = method, grl, {}


class DANNHooks(_Record):
    def pixel_features(self, features: dict) -> None:
        tokens = features["tokens"]  # [B, N, C]
        pooled = tokens.mean(1)  # [B, C]
        if self.grl is not None:
            self.store["logits"] = self.method.disc(grad_reverse(pooled, self.grl))  # [B]


class DANN(Finetune):
    """Global adversarial (DANN-style): one image-level discriminator, behind a GRL, on pooled backbone tokens."""

    name = "dann"
    needs_source = True

    def __init__(self, *, embed_dim: int, disc_hidden: int, disc_dropout: float, **common):
        super().__init__(**common)
        self.disc = Discriminator(in_dim=embed_dim, hidden=disc_hidden, dropout=disc_dropout)

    def hooks(self, *, grl: float | None):
        return DANNHooks(self, grl) if grl is not None else None  # nothing changes at inference

    def domain_loss(self, labelled, other, *, labelled_is_source: bool) -> torch.Tensor:
        return domain_bce(labelled.store["logits"], labelled_is_source) + domain_bce(
            other.store["logits"], not labelled_is_source
        )


class TVTHooks(_Record):
    def backbone_attn(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Patch transferability from the last block's input tokens -> an additive per-key bias for that block."""
        x = tokens if self.grl is None else grad_reverse(tokens, self.grl)
        logits = self.method.patch_disc(x)  # [B, N]
        self.store["patch_logits"] = logits
        t = binary_entropy_bits(torch.sigmoid(logits.detach()))  # [B, N], 1 = transferable
        return torch.log(self.method.eps + t)[:, None, :]  # [B, 1, N]: the dense analogue of TVT's row scaling

    def pixel_features(self, features: dict) -> None:
        if self.grl is not None:
            pooled = features["tokens"].mean(1)  # [B, C]
            self.store["global_logits"] = self.method.global_disc(grad_reverse(pooled, self.grl))  # [B]


class TVT(Finetune):
    """Patch-level (TVT-style): a patch discriminator on the last ViT block's tokens whose transferability
    (binary entropy) re-weights that block's attention to each key, plus TVT's global discriminator."""

    name = "tvt"
    needs_source = True

    def __init__(self, *, embed_dim: int, disc_hidden: int, disc_dropout: float, eps: float = 1e-6, **common):
        super().__init__(**common)
        self.patch_disc = Discriminator(in_dim=embed_dim, hidden=disc_hidden, dropout=disc_dropout)
        self.global_disc = Discriminator(in_dim=embed_dim, hidden=disc_hidden, dropout=disc_dropout)
        self.eps = eps

    def hooks(self, *, grl: float | None):
        return TVTHooks(self, grl)

    def domain_loss(self, labelled, other, *, labelled_is_source: bool) -> torch.Tensor:
        local = domain_bce(labelled.store["patch_logits"], labelled_is_source) + domain_bce(
            other.store["patch_logits"], not labelled_is_source
        )
        glob = domain_bce(labelled.store["global_logits"], labelled_is_source) + domain_bce(
            other.store["global_logits"], not labelled_is_source
        )
        return local + glob


class TMTHooks(_Record):
    def pixel_features(self, features: dict) -> None:
        """ACTE on the chosen pixel-decoder map; caches the transferability map for TMA."""
        x = features["multi_scale"][self.method.level]  # [B, C, h, w]
        self.store["acte"] = self.method.acte(x, grl_coeff=self.grl)

    def decoder_attn(self, layer: int, prev: dict, hw: tuple[int, int]):  # noqa: ARG002
        # resized per layer, not cached by size: under torch.export (ONNX) the sizes are symbols, which cannot be keys
        tmap = resize_map(self.store["acte"]["tmap"], hw)  # [B, 1, h, w]
        return self.method.tma.attn_terms(tmap, prev, hw)


class TMT(Finetune):
    """TMT (method.md §4-§5): ACTE's region discriminator (mass-weighted, behind a GRL) + TMA in the decoder."""

    name = "tmt"
    needs_source = True

    def __init__(
        self,
        *,
        feature_dim: int,
        feature_stride: int,
        acte: dict,
        tma: dict,
        at_inference: bool = True,
        loss_weight: float = 0.0,
        **common,
    ):
        super().__init__(**common)
        self.feature_stride = feature_stride
        self.level = {32: 0, 16: 1, 8: 2}[feature_stride]  # the decoder memory is ordered 1/32, 1/16, 1/8
        self.acte = ACTE(in_dim=feature_dim, **acte)
        self.tma = TMA(**tma)
        self.at_inference = at_inference
        self.loss_weight = loss_weight

    def point_weight(self, hooks, outputs: dict) -> torch.Tensor | None:
        """1 + beta * W(p) on the final prediction's grid: the segmentation loss, too, prioritises regions of low
        transferability and high uncertainty (an extension of method.md §5; beta = 0 is the paper's TMT)."""
        if not self.loss_weight or hooks is None:
            return None
        masks = outputs["pred_masks"]  # [B, Q, h, w], cropped to the image
        hw = tuple(masks.shape[-2:])
        prev = {"pred_logits": outputs["pred_logits"].detach(), "pred_masks": masks.detach()}
        return 1.0 + self.loss_weight * self.tma.importance(self._image_tmap(hooks, hw), prev, hw)  # [B, 1, h, w]

    def _image_tmap(self, hooks, hw: tuple[int, int]) -> torch.Tensor:
        """ACTE's map [B, 1, h', w'] cut to the image whose pred_masks grid is hw (the map covers the padded grid)."""
        s = self.feature_stride
        return hooks.store["acte"]["tmap"][..., : -(-hw[0] * 4 // s), : -(-hw[1] * 4 // s)]

    def transferability(self, hooks, hw: tuple[int, int]) -> torch.Tensor | None:
        if hooks is None:
            return None
        return resize_map(self._image_tmap(hooks, hw), hw).clamp(0.0, 1.0)  # [B, 1, h, w]

    def hooks(self, *, grl: float | None):
        if grl is None and not self.at_inference:
            return None
        return TMTHooks(self, grl)

    def domain_loss(self, labelled, other, *, labelled_is_source: bool) -> torch.Tensor:
        return ACTE.loss(labelled.store["acte"], labelled_is_source) + ACTE.loss(
            other.store["acte"], not labelled_is_source
        )


class Trainer(nn.Module):
    """Segmenter + adaptation method + criterion; `forward(batches, step)` returns the step's losses."""

    def __init__(self, *, model: nn.Module, method: nn.Module, criterion: SetCriterion):
        super().__init__()
        self.model, self.method, self.criterion = model, method, criterion

    def forward(self, batches: dict[str, dict], *, step: int) -> dict:
        return self.method(self.model, self.criterion, batches, step=step)


METHODS: dict[str, type[Finetune]] = {"finetune": Finetune, "dann": DANN, "tvt": TVT, "tmt": TMT}


def preserve_weight(cfg) -> float:
    """The preservation term's weight for cfg's method: adapt.preserve.weight if the method is listed, else 0."""
    p = cfg.adapt.preserve
    return float(p.weight) if cfg.adapt.method in p.methods else 0.0


def build_method(cfg) -> Finetune:
    """The only reader of cfg.adapt: every [choice] of method.md becomes a constructor argument here."""
    a = cfg.adapt
    common = dict(
        num_classes=cfg.data.num_classes,
        ignore_index=cfg.data.ignore_index,
        unsupervised=a.unsupervised,
        adv_weight=a.adv_weight,
        max_iter=a.grl_max_iter or cfg.train.iters,
        preserve=dict(weight=preserve_weight(cfg), images=a.preserve.images, weighting=a.preserve.weighting),
    )
    disc = dict(disc_hidden=a.acte.disc_hidden, disc_dropout=a.acte.disc_dropout)
    if a.method == "finetune":
        return Finetune(**common)
    if a.method == "dann":
        return DANN(embed_dim=cfg.model.backbone.embed_dim, **disc, **common)
    if a.method == "tvt":
        return TVT(embed_dim=cfg.model.backbone.embed_dim, eps=a.tma.eps, **disc, **common)
    t = a.tma
    return TMT(
        feature_dim=cfg.model.conv_dim,
        feature_stride=a.acte.feature_stride,
        at_inference=t.at_inference,
        loss_weight=t.loss_weight,
        acte=dict(cell=a.acte.cell, iters=a.acte.iters, kappa=a.acte.kappa, **disc),
        tma=dict(
            num_heads=cfg.model.nheads,
            alpha=t.alpha,
            combine=t.combine,
            uncertainty=t.uncertainty,
            form=t.form,
            learn_lambda=t.learn_lambda,
            lambda_init=t.lambda_init,
            eps=t.eps,
        ),
        **common,
    )


def build_trainer(cfg) -> Trainer:
    from .models.build import build_criterion, build_model

    return Trainer(model=build_model(cfg), method=build_method(cfg), criterion=build_criterion(cfg))
