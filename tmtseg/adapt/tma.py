"""TMA, Transferable Masked Attention (docs/method.md §5): a per-head, per-key term for the decoder's
masked cross-attention that favours regions of low transferability and high semantic uncertainty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.errors import ConfigError
from tmtseg.modeling.inference import semantic_probs
from tmtseg.settings import setting


@dataclass
class TMASettings:
    """`adapt.tma`: TMA (docs/method.md §5)."""

    alpha: float = setting(0.5, low=0, high=1)  # W = alpha * (1 - T) + (1 - alpha) * U
    combine: str = setting("mix", choices=("mix", "product"))
    uncertainty: bool = True  # U on; False = W from transferability alone
    form: str = setting("additive", choices=("additive", "multiplicative"))  # log bias before softmax | scale probs
    learn_lambda: bool = True  # lambda_h learnable per head
    lambda_init: float = setting(0.0)  # 0: training starts exactly as vanilla Mask2Former
    # lambda's lr = train.lr * this: Adam moves a parameter by ~lr per step, so a lambda starting at 0 would stay
    # within 0.01 of vanilla over a 100-step adaptation at the segmenter's 1e-4, i.e. TMA would never act
    lambda_lr_mult: float = setting(100.0, low=0)
    # where the bias acts: "decoder", the mask decoder's masked cross-attention (ACTE on a pixel-decoder map, as the
    # paper's first version); "vit", the self-attention of the ViT's last vit_blocks blocks (ACTE on the tokens entering
    # them, as the paper's latest abstract); "both"
    where: str = setting("decoder", choices=("decoder", "vit", "both"))
    vit_blocks: int = setting(4, low=0)  # where=vit|both: the last k blocks take the bias (0 = all)
    eps: float = setting(1e-6, low=0, positive=True)
    at_inference: bool = True  # run ACTE + TMA on target images at test time
    # beta: the mask losses weight each point by 1 + beta * W (an extension; 0 = the paper's TMA, attention only)
    loss_weight: float = setting(0.0, low=0)
    # how W enters an additive bias: "log", lambda * log(eps + W) (the paper's reading); "zscore", lambda times W
    # standardised over each image's keys (an extension: W varies little within an image, so the log bias barely
    # moves attention; standardised, lambda = 1 shifts a key by one spread of W)
    normalize: str = setting("log", choices=("log", "zscore"))


def resize_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    # antialias: going from stride 4/8 down to 32 averages the pixels instead of sampling a few of them
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


class TMA(nn.Module):
    """Importance W(p) from the transferability map T and the uncertainty U, turned into attention terms.

    additive:       bias_h = lambda_h * log(eps + W), added to the logits before the softmax (normalize="zscore":
                    lambda_h * (W - mean W) / std W over the image's keys instead).
    multiplicative: scale_h = 1 + lambda_h * (W - 1), multiplying the post-softmax probabilities; this
    reading of "scale by W" keeps lambda = 0 exactly vanilla and gives a plain multiply by W at lambda = 1.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        alpha: float,
        combine: str,
        uncertainty: bool,
        form: str,
        learn_lambda: bool,
        lambda_init: float,
        eps: float,
        normalize: str = "log",
    ) -> None:
        super().__init__()
        if normalize not in ("log", "zscore"):
            raise ConfigError(f"TMA normalize={normalize!r}: must be 'log' or 'zscore'")
        self.normalize = normalize
        if combine not in ("mix", "product"):
            raise ConfigError(f"TMA combine={combine!r}: must be 'mix' or 'product'")
        if form not in ("additive", "multiplicative"):
            raise ConfigError(f"TMA form={form!r}: must be 'additive' or 'multiplicative'")
        self.alpha = alpha
        self.combine = combine
        self.use_uncertainty = uncertainty
        self.form = form
        self.eps = eps
        lambdas = torch.full((num_heads,), float(lambda_init))  # [h]
        if learn_lambda:
            self.lambdas = nn.Parameter(lambdas)
        else:
            self.register_buffer("lambdas", lambdas)

    @torch.no_grad()
    def uncertainty(self, prev: dict, hw: tuple[int, int]) -> Tensor:
        """U at resolution hw: normalised entropy in [0, 1] of the previous layer's semantic prediction, detached.

        The mask logits are resized to hw first, as the decoder does for its attention mask: at the 1/32 and 1/16
        memory this costs a fraction of the stride-4 computation (TMA's inference overhead)."""
        masks = F.interpolate(prev["pred_masks"].float(), size=hw, mode="bilinear", align_corners=False)  # [B, Q, h, w]
        probs = semantic_probs(prev["pred_logits"].float(), masks)  # [B, K, h, w]
        num_classes = probs.shape[1]
        if num_classes == 1:  # one class leaves nothing to be uncertain about
            return probs.new_zeros(probs.shape[0], 1, *probs.shape[2:])
        probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -torch.special.xlogy(probs, probs).sum(1, keepdim=True)  # [B, 1, H, W]
        return (entropy / math.log(num_classes)).clamp(0.0, 1.0)

    def importance(self, tmap: Tensor, prev: dict, hw: tuple[int, int]) -> Tensor:
        """W at the attention resolution hw: [B, 1, H, W], in [0, 1]."""
        if tmap.shape[-2:] != hw:
            tmap = resize_map(tmap, hw)
        low_t = 1.0 - tmap.clamp(0.0, 1.0)  # [B, 1, H, W]
        if not self.use_uncertainty:
            return low_t
        return self.mix(low_t, self.uncertainty(prev, hw).clamp(0.0, 1.0).to(low_t.dtype))

    def mix(self, low_t: Tensor, u: Tensor) -> Tensor:
        """W from 1 - T and U (any equal shapes) as this TMA combines them (`tmtseg advise` reads W this way too)."""
        if not self.use_uncertainty:
            return low_t
        if self.combine == "product":
            return low_t * u
        return self.alpha * low_t + (1.0 - self.alpha) * u

    def attn_terms(self, tmap: Tensor, prev: dict, hw: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        """(bias, scale), each [B, h, H*W] or None: what the segmenter's ``decoder_attn`` hook returns."""
        return self.terms_from_w(self.importance(tmap, prev, hw).flatten(2))

    def terms_from_w(self, w: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(bias, scale) [B, h, N] from W [B, 1, N]."""
        lam = self.lambdas[None, :, None].to(w.dtype)  # [1, h, 1]
        if self.form == "additive" and self.normalize == "zscore":
            z = (w - w.mean(-1, keepdim=True)) / (w.std(-1, keepdim=True) + 1e-6)  # over each image's keys
            return lam * z, None  # [B, h, H*W]
        if self.form == "additive":
            return lam * torch.log(self.eps + w), None  # [B, h, H*W]
        return None, 1.0 + lam * (w - 1.0)  # [B, h, H*W]
