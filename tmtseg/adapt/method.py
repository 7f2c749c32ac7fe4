"""An adaptation method as pieces composed into one pipeline (docs/method.md §2, §6): the segmentation loss on the
labelled batch, plus domain alignment (aligners), attention biases, regularisers and the choice of trained weights
(tuning), each behind its contract in tmtseg/adapt/base.py. tmtseg/adapt/registry.py names every method by its pieces;
tmtseg/adapt/build.py builds them from the config."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tmtseg import dist
from tmtseg.adapt.base import Aligner, AttentionBias, DecoderQuery, Regulariser, StepPasses, Tuning
from tmtseg.adapt.domain import grl_coeff
from tmtseg.adapt.tma import resize_map
from tmtseg.losses.criterion import SetCriterion, semantic_targets


def make_targets(labels: Tensor, *, num_classes: int, ignore_index: int) -> list[dict]:
    """[B, H, W] semantic labels -> per-image set targets (labels, masks, valid)."""
    return [semantic_targets(lab, num_classes=num_classes, ignore_index=ignore_index) for lab in labels]


class Hooks:
    """The segmenter's hook points (tmtseg/modeling/segmenter.py) over a method's pieces, for one forward; grl=None at
    inference. It holds no state: what the pieces compute comes back in the segmenter's `adapt` output. A hook point
    no piece uses is None, so that the segmenter runs there exactly as without hooks."""

    def __init__(
        self, *, align: list[Aligner], attention: list[AttentionBias], grl: Tensor | None, prior: dict | None = None
    ):
        self.align, self.attention, self.grl, self.prior = align, attention, grl, prior
        self.token_aligners = [p for p in align if p.site == "vit_tokens"]
        self.pixel_aligners = [p for p in align if p.site == "pixel_features"]
        self.vit_biases = [a for a in attention if a.site == "vit"]
        self.decoder_biases = [a for a in attention if a.site == "decoder"]
        self.backbone_attn = self._backbone_attn if self.token_aligners or self.vit_biases else None
        self.pixel_features = self._pixel_features if self.pixel_aligners else None
        self.decoder_attn = self._decoder_attn if self.decoder_biases else None
        # the ViT blocks the token pieces read and bias (one reading for all of them: the first that asks for one)
        at = [p.vit_at for p in (*self.token_aligners, *self.vit_biases) if getattr(p, "vit_at", None)]
        self.backbone_at = at[0] if at else None
        self.needs_prior = prior is None and any(getattr(a, "needs_prior", False) for a in self.vit_biases)

    def with_prior(self, prior: dict) -> Hooks:
        """These hooks with the model's own unbiased prediction on the same images (Segmenter.prior)."""
        return Hooks(align=self.align, attention=self.attention, grl=self.grl, prior=prior)

    def _backbone_attn(self, tokens: Tensor, hw: tuple[int, int]) -> tuple[Tensor | None, dict]:
        out: dict = {}
        for piece in self.token_aligners:
            out.update(piece.read(tokens, grl=self.grl, hw=hw))
        query = DecoderQuery(-1, self.prior, hw)  # layer -1: the ViT; prev: the prior prediction (or None)
        biases = [a.bias(out, query)[0] for a in self.vit_biases]
        return (sum(biases[1:], biases[0]) if biases else None), out  # [B, 1 or h, N]

    def _pixel_features(self, features: dict) -> dict:
        out: dict = {}
        for piece in self.pixel_aligners:
            out.update(piece.read(features, grl=self.grl))
        return out

    def _decoder_attn(self, layer: int, prev: dict, hw: tuple[int, int], adapt: dict):
        bias, scale = None, None  # several pieces: biases add, scales multiply
        for a in self.decoder_biases:
            b, s = a.bias(adapt, DecoderQuery(layer, prev, hw))
            bias = b if bias is None or b is None else bias + b
            scale = s if scale is None or s is None else scale * s
        return bias, scale


class AdaptationMethod(nn.Module):
    """The segmentation loss on the labelled batch + the method's pieces; `forward` returns the step's losses.

    batches: {"labelled": {image, label}, "unlabelled": {image}} (the unlabelled batch only where a piece needs it).
    The labelled batch is the target's (the source's in the unsupervised variant); `labelled_domain` names it for the
    regularisers. Pieces are registered under their recipe names, so checkpoint keys read method.<name>.*.
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
        align: dict[str, Aligner],
        attention: dict[str, AttentionBias],
        tuning: dict[str, Tuning],
        regularisers: dict[str, Regulariser],
    ):
        super().__init__()
        self.name, self.num_classes, self.ignore_index = name, num_classes, ignore_index
        self.labelled_is_source, self.adv_weight, self.max_iter = unsupervised, adv_weight, max_iter
        self.labelled_domain, self.unlabelled_domain = ("source", "target") if unsupervised else ("target", "source")
        for key, piece in {**align, **attention, **tuning}.items():
            self.add_module(key, piece)
        self.align, self.attention = list(align.values()), list(attention.values())
        self.tuning = list(tuning.values())
        self.regularisers = regularisers  # kind -> piece, in the order their terms are added
        # a regulariser reading the unlabelled domain's predictions needs the decoder on that batch too
        self.decode_unlabelled = any(self.unlabelled_domain in r.domains for r in regularisers.values())
        self.needs_unlabelled = bool(self.align) or self.decode_unlabelled

    @property
    def wants_teacher(self) -> bool:
        """Whether a regulariser needs the frozen source model (`set_teacher`)."""
        return any(r.needs_source for r in self.regularisers.values())

    def set_teacher(self, model: nn.Module) -> None:
        """The frozen source model of the regularisers (the training loop loads it from adapt.source_checkpoint)."""
        model.eval().requires_grad_(False)
        for r in self.regularisers.values():
            if r.needs_source:
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
        if not align and not attention:
            return None
        return Hooks(align=align, attention=attention, grl=grl)

    def inference_hooks(self) -> Hooks | None:
        return self.hooks(grl=None)

    def transferability(self, adapt: dict, hw: tuple[int, int]) -> Tensor | None:
        """T(p) [B, 1, h, w] on the pred_masks grid of the image (None: no piece estimates one)."""
        for piece in self.align:
            tmap = piece.transfer_map(adapt, hw)
            if tmap is not None:
                return resize_map(tmap, hw).clamp(0.0, 1.0)
        return None

    def point_weight(self, outputs: dict) -> Tensor | None:
        """Per-pixel weights [B, 1, h, w] of the mask losses on the pred_masks grid (None = uniform)."""
        weighted = [a for a in self.attention if a.loss_weight]
        if not weighted:
            return None
        for piece in self.align:
            tmap = piece.transfer_map(outputs["adapt"], tuple(outputs["pred_masks"].shape[-2:]))
            if tmap is not None:
                return weighted[0].point_weight(tmap, outputs)
        return None

    def seg_loss(self, criterion: SetCriterion, batch: dict, outputs: dict) -> dict:
        targets = make_targets(batch["label"], num_classes=self.num_classes, ignore_index=self.ignore_index)
        num_masks = dist.all_reduce_mean(torch.tensor(float(criterion.num_masks(targets)))).clamp(min=1.0)
        return criterion(outputs, targets, num_masks=float(num_masks))

    def forward(self, model: nn.Module, criterion: SetCriterion, batches: dict[str, dict], *, step: int) -> dict:
        # a 0-d tensor, not a float: a compiled segmenter (train.compile) reads it as an input, where a new float at
        # every step would be a new constant and a recompile
        grl = torch.tensor(grl_coeff(step, self.max_iter), dtype=torch.float32)
        labelled = batches["labelled"]
        outputs = model(labelled["image"], hooks=self.hooks(grl=grl))
        weight = self.point_weight(outputs)
        if weight is not None:
            outputs = {**outputs, "point_weight": weight}
        losses = self.seg_loss(criterion, labelled, outputs)
        passes = {self.labelled_domain: (labelled["image"], outputs)}
        if "unlabelled" in batches and self.needs_unlabelled:
            images = batches["unlabelled"]["image"]
            if self.decode_unlabelled:
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
        step_passes = StepPasses(model=model, method=self, passes=passes)
        for reg in self.regularisers.values():
            losses[reg.name] = reg.loss(step_passes)
            losses["loss"] = losses["loss"] + losses[reg.name]
        return losses
