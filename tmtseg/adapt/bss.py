"""BSS, Batch Spectral Shrinkage (Chen et al., NeurIPS 2019, "Catastrophic Forgetting Meets Negative Transfer"): a
regulariser against negative transfer that shrinks the smallest singular values of the features the predictor reads,
where knowledge that does not transfer tends to sit. Method `bss` = fine-tuning + this term; `adapt.bss.methods` gives
it to others. This file and its lines in tmtseg/adapt/registry.py are all that adding it took (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmtseg.adapt.base import StepPasses
from tmtseg.settings import setting


@dataclass
class BSSSettings:
    """`adapt.bss`: Chen et al. penalise the k smallest squared singular values with eta = 1e-3 and k = 1."""

    weight: float = setting(1e-3, low=0)  # eta; 0 = off
    k: int = setting(1, low=1)  # how many of the smallest singular values shrink
    methods: list[str] = setting(factory=list)  # other methods that get the term (bss has it always)


class BSS:
    """eta * sum of the k smallest sigma_i^2 of each labelled image's mask-feature matrix [P, C] / sqrt(P), averaged
    over the batch. A segmenter's samples are its pixels: the mask features are what every query's mask embedding
    reads, so the decomposition is per image, over its pixels (Chen et al.'s batch of image features, made dense)."""

    name = "loss_bss"
    domains: tuple[str, ...] = ()  # it reads the labelled pass, which every step has: no extra forward pass
    needs_source = False

    def __init__(self, *, weight: float, k: int):
        self.weight, self.k = weight, k

    def set_source(self, model: nn.Module) -> None:  # noqa: ARG002
        """BSS does not compare with the source model."""

    def loss(self, step: StepPasses) -> Tensor:
        _, outputs = step.passes[step.method.labelled_domain]
        feats = outputs["features"]["mask_features"].float()  # [B, C, h, w]
        rows = feats.flatten(2).transpose(1, 2) / feats[0, 0].numel() ** 0.5  # [B, P, C], scaled by 1 / sqrt(P)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            sigma = torch.linalg.svdvals(rows)  # [B, min(P, C)], descending
        k = min(self.k, sigma.shape[-1])
        return self.weight * sigma[:, -k:].pow(2).sum(-1).mean()


def build_bss(cfg) -> BSS:
    return BSS(weight=cfg.adapt.bss.weight, k=cfg.adapt.bss.k)
