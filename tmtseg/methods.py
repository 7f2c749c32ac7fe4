"""Adaptation methods as small typed pieces composed into one pipeline (method.md §2, §6).

A method is the segmentation loss on the labelled batch plus pieces: domain alignment at image, patch or region level
(DANN, TVT-style, ACTE), attention biasing (TVT-style, TMA), regularisers toward the source model (the preservation
KL, L2-SP) and which weights train (all, LoRA, a frozen ViT). `METHODS` names every method by its pieces: the CLI, the
config validation and the bench take their names from it. `Trainer` = segmenter + method + criterion: the one module
that DDP wraps and that checkpoints hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist
from .models.acte import ACTE
from .models.criterion import SetCriterion, semantic_targets
from .models.domain import Discriminator, binary_entropy_bits, domain_bce, grad_reverse, grl_coeff
from .models.inference import semantic_probs
from .models.tma import TMA, resize_map
from .recipes import METHODS, regularisers_of


def class_distribution(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Per-pixel class distribution [B, K, h, w] (float32, sums to 1 over K) of a mask-classification output."""
    probs = semantic_probs(pred_logits.float(), pred_masks.float())  # [B, K, h, w]
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-8)


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
    at_inference = False  # it changes no prediction

    def pixel_features(self, features: dict, *, grl: float | None) -> dict:
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
    at_inference = True  # its logits are the transferability that TVT's attention term reads

    def backbone_tokens(self, tokens: Tensor, *, grl: float | None) -> dict:
        x = tokens if grl is None else grad_reverse(tokens, grl)
        return {self.key: self(x)}  # [B, N, C] -> [B, N]

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return domain_bce(labelled[self.key], labelled_is_source) + domain_bce(
            unlabelled[self.key], not labelled_is_source
        )


class RegionAlignment(ACTE):
    """Region level (ACTE, method.md §4) on one pixel-decoder map; its map T(p) feeds TMA and the KL's weighting."""

    key = "acte"

    def __init__(self, *, feature_stride: int, at_inference: bool, **acte):
        super().__init__(**acte)
        self.feature_stride = feature_stride
        self.level = {32: 0, 16: 1, 8: 2}[feature_stride]  # the decoder memory is ordered 1/32, 1/16, 1/8
        self.at_inference = at_inference

    def pixel_features(self, features: dict, *, grl: float | None) -> dict:
        return {self.key: self(features["multi_scale"][self.level], grl_coeff=grl)}  # on [B, C, h, w]

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

    def __init__(self, *, eps: float):
        super().__init__()
        self.eps = eps

    def backbone_bias(self, adapt: dict) -> Tensor:
        t = binary_entropy_bits(torch.sigmoid(adapt[PatchAlignment.key].detach()))  # [B, N], 1 = transferable
        return torch.log(self.eps + t)[:, None, :]  # [B, 1, N]: an additive per-key bias


class TMAAttention(TMA):
    """TMA (method.md §5) on ACTE's map in every masked cross-attention of the decoder; with loss_weight (beta) the
    mask losses also weight each point by 1 + beta * W (an extension; beta = 0 is the paper's TMA)."""

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

    def __init__(self, *, align: list[nn.Module], attention: list[nn.Module], grl: float | None):
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


# ------------------------------------------------------------------------------------------------------ regularisers


class PreserveKL:
    """LwF-style distillation, this project's "preservation term": KL(source model || adapted model) of the per-pixel
    class distributions on the pred_masks grid, on the images of `domains`, each pixel weighted by the method's
    transferability T(p) (weighting="transferability", where the method has a map) or uniformly."""

    name = "loss_preserve"

    def __init__(self, *, weight: float, domains: tuple[str, ...], weighting: str):
        self.weight, self.domains, self.weighting = weight, domains, weighting
        self._teacher: tuple[nn.Module, ...] = ()  # in a tuple: not a submodule, so never trained, saved or wrapped

    def set_source(self, model: nn.Module) -> None:
        self._teacher = (model,)

    def term(self, images: Tensor, outputs: dict, weight: Tensor | None) -> Tensor:
        """The KL on one batch; weight [B, 1, h, w] (detached) or None = uniform."""
        if not self._teacher:
            raise RuntimeError("preserve: set_teacher() was not called (the runner loads the source model)")
        with torch.no_grad():
            teacher = self._teacher[0](images)
            p_t = class_distribution(teacher["pred_logits"], teacher["pred_masks"])  # [B, K, h, w]
        p_s = class_distribution(outputs["pred_logits"], outputs["pred_masks"])  # [B, K, h, w]
        kl = (torch.special.xlogy(p_t, p_t) - p_t * torch.log(p_s.clamp_min(1e-8))).sum(1, keepdim=True)  # [B, 1, h, w]
        if weight is None:
            return kl.mean()
        weight = weight.detach().to(kl.dtype)
        return (kl * weight).sum() / weight.sum().clamp_min(1e-6)

    def loss(self, method: Method, passes: dict[str, tuple[Tensor, dict]]) -> Tensor:
        terms = []
        for domain in self.domains:
            if domain in passes:
                images, outputs = passes[domain]
                hw = outputs["pred_masks"].shape[-2:]
                t = method.transferability(outputs["adapt"], hw) if self.weighting == "transferability" else None
                terms.append(self.term(images, outputs, t))
        return self.weight * sum(terms) / max(len(terms), 1)


class L2SP:
    """L2-SP (Li et al., 2018): alpha/2 * |w - w_source|^2 over the segmenter's trained weights (all of which the
    source model has), beta/2 * |w|^2 over the method's new ones. AdamW's decoupled decay stays on as for every
    method (like for like); at lr 1e-4 it moves a weight by 5e-6 of itself per step, next to nothing."""

    name = "loss_l2sp"

    def __init__(self, *, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self._source: dict[str, Tensor] = {}  # the source model's weights by name: not state, never saved

    def set_source(self, model: nn.Module) -> None:
        self._source = {n: p.detach() for n, p in model.named_parameters()}

    def loss(self, model: nn.Module, method: nn.Module) -> Tensor:
        if not self._source:
            raise RuntimeError("l2sp: set_teacher() was not called (the runner loads the source model)")
        zero = next(model.parameters()).new_zeros(())  # a tensor even where nothing is trained
        anchored = sum(
            (((p - self._source[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad), zero
        )
        new = sum(((p**2).sum() for p in method.parameters() if p.requires_grad), zero)
        return 0.5 * self.alpha * anchored + 0.5 * self.beta * new


# ----------------------------------------------------------------------------------------------- which weights train

_LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class LoRA(nn.Module):
    """LoRA (Hu et al., 2021): the ViT frozen; beside each targeted linear layer of its blocks a low-rank update
    y += (alpha / rank) * B(A x), A [r, in] (Kaiming init), B [out, r] (zeros: training starts at the source model).

    Our own ~60 lines rather than peft's inject_adapter_in_model: it swaps each targeted nn.Linear for a LoRA layer that
    holds the original as `base_layer` (keys `qkv.base_layer.weight`, `qkv.lora_A.default.weight`), so the plain
    segmenter could no longer load an adapted checkpoint, and an injected model has none of PeftModel's merging (peft's
    docs, "Adapter injection"): the merge, the key mapping and the exact resume would be ours to write anyway, on top of
    an optional dependency, for two matmuls. Here A and B are the method's parameters (`method.lora.*`), applied by a
    forward hook on the frozen layer, so the segmenter's keys never change; `merged_state` writes W + (alpha / r) B A
    into the checkpoint's segmenter weights (what `tmtseg eval`/`predict` or any plain Segmenter load) and the exact
    frozen W beside it (`method.lora.base.*`), which `unmerge_state` puts back on load: a resume is bitwise exact. The
    frozen weights have requires_grad=False, which DDP skips; every LoRA factor is used in every forward. As fresh
    modules of the method, the factors train at adapt.head_lr_mult x train.lr (runner.lr_mult): B starts at zero."""

    def __init__(self, *, rank: int, alpha: float, targets: list[str]):
        super().__init__()
        self.rank, self.scale, self.targets = rank, alpha / rank, [_LORA_TARGETS[t] for t in targets]
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        self._layers: dict[str, str] = {}  # factor key -> the layer's name in the segmenter
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        vit = model.backbone.vit
        vit.requires_grad_(False)
        for name, layer in vit.named_modules():
            if isinstance(layer, nn.Linear) and any(name.endswith(t) for t in self.targets):
                key = name.replace(".", "_")
                a = torch.empty(self.rank, layer.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and the LoRA reference) initialise A
                self.a[key] = nn.Parameter(a)
                self.b[key] = nn.Parameter(torch.zeros(layer.out_features, self.rank))
                self._layers[key] = f"backbone.vit.{name}"
                self._handles.append(layer.register_forward_hook(self._hook(key)))
        if not self._layers:
            raise RuntimeError(f"lora: no linear layer of the ViT matches {self.targets}")

    def _hook(self, key: str):
        def add_update(layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:  # noqa: ARG001
            x = inputs[0]  # [B, N, in]
            return output + self.scale * F.linear(F.linear(x, self.a[key]), self.b[key])  # [B, N, r] -> [B, N, out]

        return add_update

    def delta(self, key: str) -> Tensor:
        return self.scale * self.b[key] @ self.a[key]  # [out, r] x [r, in] -> [out, in]

    def merged_state(self, state: dict, prefix: str) -> None:
        """In a trainer's state dict: the segmenter's weights with the update merged in, the frozen ones beside."""
        for key, layer in self._layers.items():
            w = state[f"{prefix}model.{layer}.weight"]
            state[f"{prefix}method.lora.base.{key}"] = w
            state[f"{prefix}model.{layer}.weight"] = w + self.delta(key).detach().to(w.dtype)

    def unmerge_state(self, state: dict, prefix: str) -> None:
        """Before loading a trainer's state dict: the frozen weights back in place of the merged ones."""
        for key, layer in self._layers.items():
            base = state.pop(f"{prefix}method.lora.base.{key}", None)
            if base is not None:
                state[f"{prefix}model.{layer}.weight"] = base


class FrozenBackbone(nn.Module):
    """The ViT frozen (the feature pyramid, pixel decoder and mask decoder train): linear-probing's analogue."""

    def attach(self, model: nn.Module) -> None:
        model.backbone.vit.requires_grad_(False)


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

    def hooks(self, *, grl: float | None) -> Hooks | None:
        """The hook object of one forward (None = vanilla Mask2Former); grl=None means inference."""
        align = [p for p in self.align if grl is not None or p.at_inference]
        attention = [p for p in self.attention if grl is not None or p.at_inference]
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
        grl = grl_coeff(step, self.max_iter)
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
                losses[reg.name] = reg.loss(self, passes)
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
        in_dim=cfg.model.conv_dim,
        feature_stride=a.acte.feature_stride,
        at_inference=a.tma.at_inference,
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
        at_inference=t.at_inference,
        loss_weight=t.loss_weight,
    )


def _preserve(cfg) -> PreserveKL:
    p = cfg.adapt.preserve
    domains = ("source", "target") if p.images == "both" else (p.images,)
    return PreserveKL(weight=p.weight, domains=domains, weighting=p.weighting)


# Builders: plain functions in plain dicts, each the only reader of its config section.
ALIGN = {"image": lambda cfg: ImageAlignment(**_disc(cfg)), "patch": lambda cfg: PatchAlignment(**_disc(cfg)),
         "region": _region}  # fmt: skip
ATTENTION = {"patch": lambda cfg: PatchAttention(eps=cfg.adapt.tvt.eps), "tma": _tma}
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
        align={name: ALIGN[kind](cfg) for name, kind in recipe.align},
        attention={name: ATTENTION[kind](cfg) for name, kind in recipe.attention},
        tuning={name: TUNING[kind](cfg) for name, kind in recipe.tuning},
        regularisers=[REGULARISERS[kind](cfg) for kind in regularisers_of(a)],
    )


class Trainer(nn.Module):
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


def build_trainer(cfg) -> Trainer:
    from .models.build import build_criterion, build_model

    return Trainer(model=build_model(cfg), method=build_method(cfg), criterion=build_criterion(cfg))
