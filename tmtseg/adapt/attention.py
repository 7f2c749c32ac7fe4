"""Attention-bias pieces (the AttentionBias contract of tmtseg/adapt/base.py): TVT's patch re-weighting of the last
ViT block and TMA in the decoder's masked cross-attention (docs/method.md §5, §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmtseg.adapt.align import PatchAlignment, RegionAlignment, vit_blocks
from tmtseg.adapt.base import DecoderQuery
from tmtseg.adapt.domain import binary_entropy_bits
from tmtseg.adapt.tma import TMA, resize_map
from tmtseg.errors import ConfigError
from tmtseg.settings import setting


@dataclass
class TVTSettings:
    """`adapt.tvt`: TVT-style patch-level alignment (docs/method.md §6)."""

    eps: float = setting(1e-6, low=0, positive=True)  # bias = log(eps + t): finite where t = 0 (certainly one domain)


class PatchAttention(nn.Module):
    """TVT-style: the last ViT block's attention to each key re-weighted by that patch's transferability (binary
    entropy of the patch discriminator): the dense analogue of TVT's scaling of the class-token row."""

    site = "vit"
    at_inference = True
    reads = PatchAlignment.key  # the alignment piece whose outputs it needs, at inference too
    loss_weight = 0.0

    def __init__(self, *, eps: float):
        super().__init__()
        self.eps = eps

    def bias(self, adapt: dict, query: DecoderQuery | None) -> tuple[Tensor, None]:  # noqa: ARG002
        t = binary_entropy_bits(torch.sigmoid(adapt[PatchAlignment.key].detach()))  # [B, N], 1 = transferable
        return torch.log(self.eps + t)[:, None, :], None  # [B, 1, N]: an additive per-key bias

    def point_weight(self, tmap: Tensor, outputs: dict) -> Tensor:  # noqa: ARG002
        raise NotImplementedError("PatchAttention does not weight the mask losses (loss_weight = 0)")


class TMAAttention(TMA):
    """TMA (docs/method.md §5) on ACTE's map in every masked cross-attention of the decoder; with loss_weight (beta)
    the mask losses also weight each point by 1 + beta * W (an extension; beta = 0 is the paper's TMA)."""

    site = "decoder"
    reads = RegionAlignment.key

    def __init__(self, *, at_inference: bool, loss_weight: float, **tma):
        super().__init__(**tma)
        self.at_inference, self.loss_weight = at_inference, loss_weight

    def bias(self, adapt: dict, query: DecoderQuery | None) -> tuple[Tensor | None, Tensor | None]:
        tmap = resize_map(adapt[RegionAlignment.key]["tmap"], query.hw)  # [B, 1, h, w]
        return self.attn_terms(tmap, query.prev, query.hw)

    def point_weight(self, tmap: Tensor, outputs: dict) -> Tensor:
        """1 + beta * W(p) [B, 1, h, w] on the final prediction's grid (tmap: T cut to the image)."""
        masks = outputs["pred_masks"]  # [B, Q, h, w], cropped to the image
        hw = tuple(masks.shape[-2:])
        prev = {"pred_logits": outputs["pred_logits"].detach(), "pred_masks": masks.detach()}
        return 1.0 + self.loss_weight * self.importance(tmap, prev, hw)


class ViTTMAAttention(TMA):
    """TMA inside the ViT's self-attention (the paper's latest abstract, docs/method.md §5): in each of the last
    adapt.tma.vit_blocks blocks, every head's logits get lambda_h * f(W) over the keys, W from the map of ACTE on the
    tokens entering those blocks (TokenRegionAlignment) and, with `uncertainty`, U from the model's own prediction on
    the same image without the bias (Segmenter.prior: at lambda = 0 that is the source model's prediction; later the
    adapted model's, so U keeps pointing where the model is still unsure, at training and test time alike, with no
    second model to ship). An additive float mask keeps SDPA's fused path at inference; lambda = 0 is the source model
    exactly."""

    site = "vit"
    reads = RegionAlignment.key

    def __init__(self, *, vit_at: tuple[int, int, int], at_inference: bool, **tma):
        super().__init__(**tma)
        self.vit_at, self.at_inference, self.loss_weight = vit_at, at_inference, 0.0
        self.needs_prior = self.use_uncertainty

    def bias(self, adapt: dict, query: DecoderQuery | None) -> tuple[Tensor | None, None]:
        if self.use_uncertainty and query.prev is None:
            raise RuntimeError("TMA in the ViT with uncertainty needs the model's prior prediction (Segmenter.prior)")
        tmap = adapt[RegionAlignment.key]["tmap"]  # [B, 1, h, w] on the token grid
        return self.attn_terms(tmap, query.prev or {}, query.hw)[0], None  # [B, h, N]

    def point_weight(self, tmap: Tensor, outputs: dict) -> Tensor:  # noqa: ARG002
        raise NotImplementedError("TMA in the ViT does not weight the mask losses")


# ------------------------------------------------------------------------------------- builders: the config readers


def build_patch_attention(cfg) -> PatchAttention:
    return PatchAttention(eps=cfg.adapt.tvt.eps)


def _tma_args(cfg, num_heads: int) -> dict:
    """The TMA settings both readings share (adapt.tma), for `num_heads` heads."""
    t = cfg.adapt.tma
    return dict(
        num_heads=num_heads,
        alpha=t.alpha,
        combine=t.combine,
        uncertainty=t.uncertainty,
        form=t.form,
        learn_lambda=t.learn_lambda,
        lambda_init=t.lambda_init,
        eps=t.eps,
        normalize=t.normalize,
        at_inference=t.at_inference,
    )


def build_tma(cfg) -> TMAAttention:
    return TMAAttention(**_tma_args(cfg, cfg.model.nheads), loss_weight=cfg.adapt.tma.loss_weight)


def build_vit_tma(cfg) -> ViTTMAAttention:
    if cfg.adapt.tma.form != "additive":
        raise ConfigError("config key adapt.tma.form: TMA in the ViT takes the additive form (a bias on SDPA's logits)")
    return ViTTMAAttention(vit_at=vit_blocks(cfg), **_tma_args(cfg, cfg.model.backbone.num_heads))
