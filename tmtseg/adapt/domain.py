"""Domain-adversarial building blocks: gradient reversal, the domain discriminator, its loss and
the binary-entropy transferability (docs/method.md §4 region transferability, §6 DANN/TVT baselines)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.modeling.layers import MLP
from tmtseg.settings import setting


@dataclass
class DiscSettings:
    """`adapt.disc`: the domain discriminators of every aligning method (DANN's image level, TVT's patch and global,
    ACTE's region level), a 3-layer MLP each. One section, so that the methods compare with discriminators of the
    same size."""

    hidden: int = setting(256, low=1)  # DANN's 1024 is for 2048-d ResNet features; our token widths are 192-384
    dropout: float = setting(0.1, low=0, high=1)


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by -coeff (Ganin & Lempitsky's GRL)."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: Tensor) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # in float32, rounded once to grad's dtype: bitwise what `-float * grad` gives (a Python scalar is applied in
        # float32 to a bf16 tensor too); a 0-d tensor coeff of another dtype would round it first
        return (grad.float() * -ctx.coeff.float()).to(grad.dtype), None


def grad_reverse(x: Tensor, coeff: float | Tensor = 1.0) -> Tensor:
    """Gradient reversal layer: ``x`` forward, ``-coeff * grad`` backward.

    ``coeff`` changes every step (the GRL ramp): pass it as a 0-d tensor made outside a compiled model, which
    torch.compile then reads as an input instead of a constant that recompiles the graph at each new value."""
    if not isinstance(coeff, Tensor):
        coeff = torch.tensor(float(coeff), dtype=torch.float32)
    return GradReverse.apply(x, coeff)


def grl_coeff(step: int, max_iter: int) -> float:
    """The DANN ramp ``2 / (1 + exp(-10 step / max_iter)) - 1``: 0 at step 0, -> 1 at the end."""
    progress = min(max(step / max(max_iter, 1), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def binary_entropy_bits(p: Tensor, eps: float = 1e-6) -> Tensor:
    """H2(p) in bits: 1 at p = 0.5, -> 0 at p in {0, 1}; p is clamped so that log and its grad stay finite.

    Computed in float32: in bf16, 1 - eps rounds to 1 and the entropy would be NaN."""
    p = p.float().clamp(eps, 1.0 - eps)
    return -(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))


class Discriminator(nn.Module):
    """Domain discriminator: an MLP with ReLU and dropout, one logit per row (sigmoid = P(source)).

    Works on any ``[..., C]`` input and returns ``[...]``.
    """

    def __init__(self, *, in_dim: int, hidden: int, dropout: float, layers: int = 3) -> None:
        super().__init__()
        self.net = MLP(in_dim, hidden, 1, layers, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # [..., C] -> [...]


def domain_bce(logits: Tensor, is_source: bool | Tensor, weight: Tensor | None = None) -> Tensor:
    """BCE-with-logits against the domain label (1 = source, 0 = target), optionally weighted.

    ``is_source``: one bool for the whole batch, or a bool tensor [B] (one per image) broadcast over the
    trailing dims of ``logits``. ``weight`` (same shape as logits): the loss is ``sum(w * bce) / sum(w)``.
    """
    if isinstance(is_source, Tensor):
        label = is_source.to(logits.dtype).reshape(is_source.shape + (1,) * (logits.dim() - is_source.dim()))
        label = label.expand_as(logits)
    else:
        label = torch.full_like(logits, float(is_source))
    bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    if weight is None:
        return bce.mean()
    weight = weight.to(bce.dtype).expand_as(bce)
    return (weight * bce).sum() / weight.sum().clamp_min(1e-12)
