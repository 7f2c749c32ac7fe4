"""Regularisers toward the source model (docs/method.md §6; the Regulariser contract of tmtseg/adapt/base.py), given
to any method: the KL to the frozen source model's predictions (LwF / this project's preservation term) and L2-SP's
pull of the weights toward the source weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmtseg.adapt.base import StepPasses
from tmtseg.modeling.feature_cache import hooked, state_version
from tmtseg.modeling.inference import semantic_probs
from tmtseg.modeling.layers import DropPath
from tmtseg.settings import setting


@dataclass
class PreserveSettings:
    """`adapt.preserve`: source-knowledge preservation (an extension; not in the paper), a KL term that keeps the
    adapted model's semantic prediction close to the frozen source model's. The method `lwf` is fine-tuning with it;
    the methods listed in `methods` get it too. With a transferability map (TMT) each pixel counts by T(p): what the
    source model knows is kept where the domains look alike, adaptation is free where they do not (docs/method.md §5).
    weight 0 = off, i.e. the paper's TMT."""

    weight: float = setting(10.0, low=0)
    methods: list[str] = setting(factory=lambda: ["tmt"])  # the methods that use it (a control: [finetune])
    # source (the unlabelled source batch) | target (the labelled target batch) | both
    images: str = setting("source", choices=("source", "target", "both"))
    # transferability (T(p) where the method has a map; else uniform) | uniform
    weighting: str = setting("transferability", choices=("transferability", "uniform"))


@dataclass
class L2SPSettings:
    """`adapt.l2sp`: L2-SP (Li et al., 2018), alpha/2 * |w - w_source|^2 on the weights the source model has (the
    whole segmenter), beta/2 * |w|^2 on the method's new ones. The method `l2sp` is fine-tuning with it; `methods`
    gives it to others (like for like: TMT + L2-SP against fine-tuning + L2-SP)."""

    # Li et al. find alpha in 0.01-0.1 best for transfer (0.01 for segmentation) and keep beta = 0.01; the pull is
    # summed over every weight, against a segmentation loss of ~40 (7 deep-supervised layers), so the small end
    alpha: float = setting(0.01, low=0)
    beta: float = setting(0.01, low=0)
    methods: list[str] = setting(factory=list)  # other methods that get the term (l2sp has it always)


def class_distribution(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Per-pixel class distribution [B, K, h, w] (float32, sums to 1 over K) of a mask-classification output; float32
    under autocast too (its einsum would run in bf16 there)."""
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        probs = semantic_probs(pred_logits.float(), pred_masks.float())  # [B, K, h, w]
        return probs / probs.sum(1, keepdim=True).clamp_min(1e-8)


class PreserveKL:
    """LwF-style distillation, this project's "preservation term": KL(source model || adapted model) of the per-pixel
    class distributions on the pred_masks grid, on the images of `domains`, each pixel weighted by the method's
    transferability T(p) (weighting="transferability", where the method has a map) or uniformly."""

    name = "loss_preserve"
    needs_source = True

    def __init__(self, *, weight: float, domains: tuple[str, ...], weighting: str):
        self.weight, self.domains, self.weighting = weight, domains, weighting
        self._teacher: tuple[nn.Module, ...] = ()  # in a tuple: not a submodule, so never trained, saved or wrapped
        self._same_vit: tuple[tuple, bool] | None = None  # (the student ViT's state key, whether it is the teacher's)

    def set_source(self, model: nn.Module) -> None:
        self._teacher = (model,)
        self._same_vit = None

    def shares_vit(self, student: nn.Module) -> bool:
        """Whether the source model's ViT computes exactly what the adapted model's does, so that the teacher can take
        the student's ViT tokens instead of running its own ViT (a frozen ViT, as in every method but LoRA here: a
        third of the KL methods' step). True only when nothing can differ: the same weights (compared when any of
        them changed), the same input pipeline (pixel mean/std, token stride, fit), no forward hook on the student's
        ViT (LoRA's update) and no stochastic depth in training. An attention bias on the student's pass is checked
        per batch (`tokens_biased`)."""
        teacher = self._teacher[0]
        s, t = getattr(student, "backbone", None), getattr(teacher, "backbone", None)
        vit = getattr(s, "vit", None)
        if vit is None or getattr(t, "vit", None) is None or hooked(vit):
            return False
        if any(p.requires_grad for p in vit.parameters()):  # it moves at every step: never worth comparing
            return False
        if vit.training and any(isinstance(m, DropPath) and m.p > 0 for m in vit.modules()):
            return False
        key = (id(teacher), *state_version(vit))
        if self._same_vit is None or self._same_vit[0] != key:
            a, b = vit.state_dict(), t.vit.state_dict()
            same = (
                (s.token_stride, s.fit) == (t.token_stride, t.fit)
                and torch.equal(student.pixel_mean, teacher.pixel_mean)
                and torch.equal(student.pixel_std, teacher.pixel_std)
                and a.keys() == b.keys()
                and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a)
            )
            self._same_vit = (key, same)
        return self._same_vit[1]

    def term(self, images: Tensor, outputs: dict, weight: Tensor | None, *, student: nn.Module | None = None) -> Tensor:
        """The KL on one batch; weight [B, 1, h, w] (detached) or None = uniform. student: the adapted segmenter whose
        forward gave `outputs` (its ViT tokens are reused when `shares_vit`)."""
        if not self._teacher:
            raise RuntimeError("preserve: set_teacher() was not called (the runner loads the source model)")
        features = outputs.get("features", {})
        shared = None
        if student is not None and not features.get("tokens_biased", True) and self.shares_vit(student):
            shared = (features["tokens"].detach(), features["tokens_hw"])
        with torch.no_grad():
            teacher = self._teacher[0](images) if shared is None else self._teacher[0](images, vit_tokens=shared)
            p_t = class_distribution(teacher["pred_logits"], teacher["pred_masks"])  # [B, K, h, w]
        p_s = class_distribution(outputs["pred_logits"], outputs["pred_masks"])  # [B, K, h, w]
        kl = (torch.special.xlogy(p_t, p_t) - p_t * torch.log(p_s.clamp_min(1e-8))).sum(1, keepdim=True)  # [B, 1, h, w]
        if weight is None:
            return kl.mean()
        weight = weight.detach().to(kl.dtype)
        return (kl * weight).sum() / weight.sum().clamp_min(1e-6)

    def loss(self, step: StepPasses) -> Tensor:
        terms = []
        for domain in self.domains:
            if domain in step.passes:
                images, outputs = step.passes[domain]
                hw = outputs["pred_masks"].shape[-2:]
                t = step.method.transferability(outputs["adapt"], hw) if self.weighting == "transferability" else None
                terms.append(self.term(images, outputs, t, student=step.model))
        return self.weight * sum(terms) / max(len(terms), 1)


class L2SP:
    """L2-SP (Li et al., 2018): alpha/2 * |w - w_source|^2 over the segmenter's trained weights (all of which the
    source model has), beta/2 * |w|^2 over the method's new ones. AdamW's decoupled decay stays on as for every
    method (like for like); at lr 1e-4 it moves a weight by 5e-6 of itself per step, next to nothing."""

    name = "loss_l2sp"
    domains: tuple[str, ...] = ()  # it reads weights, no forward pass
    needs_source = True

    def __init__(self, *, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self._source: dict[str, Tensor] = {}  # the source model's weights by name: not state, never saved

    def set_source(self, model: nn.Module) -> None:
        self._source = {n: p.detach() for n, p in model.named_parameters()}

    def loss(self, step: StepPasses) -> Tensor:
        model, method = step.model, step.method
        if not self._source:
            raise RuntimeError("l2sp: set_teacher() was not called (the runner loads the source model)")
        zero = next(model.parameters()).new_zeros(())  # a tensor even where nothing is trained
        anchored = sum(
            (((p - self._source[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad), zero
        )
        new = sum(((p**2).sum() for p in method.parameters() if p.requires_grad), zero)
        return 0.5 * self.alpha * anchored + 0.5 * self.beta * new


# ------------------------------------------------------------------------------------- builders: the config readers


def build_preserve(cfg) -> PreserveKL:
    p = cfg.adapt.preserve
    domains = ("source", "target") if p.images == "both" else (p.images,)
    return PreserveKL(weight=p.weight, domains=domains, weighting=p.weighting)


def build_l2sp(cfg) -> L2SP:
    return L2SP(alpha=cfg.adapt.l2sp.alpha, beta=cfg.adapt.l2sp.beta)
