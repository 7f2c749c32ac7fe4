"""The segmenter (docs/method.md §3): backbone -> pixel decoder -> masked-attention decoder, composed by injection, with
the hook points where the adaptation methods (DANN, TVT-style, TMT) plug in."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from tmtseg.modeling.inference import eval_mode

SIZE_DIVISOR = 32  # the coarsest memory stride: inputs are padded to a multiple of it
# ... and to at least twice it: an input of 32 px or less would leave the stride-32 maps 1 px wide, where GroupNorm
# with one channel per group has a single value to normalise and fails
MIN_SIZE = 2 * SIZE_DIVISOR


def _padded(size: int) -> int:
    """The padded input size: a multiple of SIZE_DIVISOR, at least MIN_SIZE."""
    return torch.sym_max(size + (-size % SIZE_DIVISOR), MIN_SIZE)  # sym_max: no guard on an exported size


def _part(name: str):
    """A labelled part of the profile (benchmarks/speed_step.py; ~1 us when nothing profiles). Not inside a compiled
    graph, where dynamo would drop it with a warning."""
    return nullcontext() if torch.compiler.is_compiling() else record_function(name)


class SegmenterHooks(Protocol):
    """Where an adaptation method plugs into a forward (tmtseg/adapt/method.py's Hooks); None = not used."""

    backbone_attn: Callable[[Tensor, tuple[int, int]], tuple[Tensor | None, dict]] | None
    # (read, start[, pool]): the ViT block whose input backbone_attn reads (pooled with the next pool - 1 blocks'
    # inputs), the first block its bias acts on; None = the last
    backbone_at: tuple[int, ...] | None
    pixel_features: Callable[[dict], dict] | None
    decoder_attn: Callable[[int, dict, tuple[int, int], dict], tuple[Tensor | None, Tensor | None]] | None
    # whether backbone_attn needs the model's own prediction on the same images first (with_prior gives it)
    needs_prior: bool

    def with_prior(self, prior: dict) -> SegmenterHooks: ...


class Segmenter(nn.Module):
    """Mask2Former-style segmenter on a ViT.

    `forward(images, *, hooks=None, return_attn=False)` returns:
      pred_logits [B, Q, K+1], pred_masks [B, Q, ceil(H/4), ceil(W/4)] (last layer);
      aux_outputs: in train mode, a list of dicts with pred_logits / pred_masks, the prediction before the first
        decoder layer and after each layer but the last (deep supervision); at inference (eval mode, no gradients)
        [] (nothing reads them, and the decoder's fast path makes the earlier masks only at the attention sizes they
        feed);
      features: tokens [B, N, C] (final ViT patch tokens after norm), tokens_hw (h, w), tokens_biased (whether a
        hook's attention bias changed them), multi_scale (list of
        [B, Cd, h, w] at strides 32, 16, 8), mask_features [B, Cm, ceil(H/4), ceil(W/4)], backbone {stride: [B, Cb, h,
        w]};
      adapt: what the hooks returned (see below; {} without hooks);
      with return_attn: attn (per layer [B, h, Q, N] probabilities), attn_masks (per layer bool [B, Q, N], True =
        masked out), attn_hw (per layer (h, w)).
    Images are padded (bottom/right) to a multiple of 32, at least 64; the backbone, pixel-decoder maps and everything
    the hooks see live on that padded grid, while pred_masks and mask_features are cropped back to the image.

    hooks (a SegmenterHooks, tmtseg/adapt/method.py's Hooks; each hook may be None): backbone_attn(tokens, hw) ->
    (bias [B, 1 or h, N] | None, outputs dict), the bias added to the keys of the last ViT block; pixel_features(
    features) -> outputs dict, after the pixel decoder; decoder_attn(layer, prev, hw, adapt) -> (bias [B, h, h*w] |
    None, scale [B, h, h*w] | None) for the masked cross-attention of decoder layer `layer`, where prev holds the
    (detached) previous prediction on the padded grid (in eval mode at the attention size (h, w) already) and adapt
    what the other two hooks returned. What the hooks
    return comes back as `adapt` (a dict; empty without hooks) in the output and in `features`: the methods'
    discriminator logits and transferability maps, never a side channel.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        decoder: nn.Module,
        pixel_mean: list[float] | tuple[float, ...],
        pixel_std: list[float] | tuple[float, ...],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.num_classes = decoder.num_classes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def encode(
        self, images: Tensor, *, hooks: SegmenterHooks | None = None, vit_tokens: tuple[Tensor, tuple] | None = None
    ) -> dict:
        """Backbone + pixel decoder only: the `features` dict of `forward` (what the domain discriminators need)."""
        H, W = images.shape[-2:]
        if hooks is not None and getattr(hooks, "needs_prior", False):
            hooks = hooks.with_prior(self.prior(images))
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        # zero after normalisation = the mean colour, as detectron2 pads its batches
        x = F.pad(x, (0, _padded(W) - W, 0, _padded(H) - H))  # [B, 3, H', W']
        adapt: dict = {}
        backbone_hook = hooks.backbone_attn if hooks is not None else None
        biased = False

        def attn_hook(tokens: Tensor, hw: tuple[int, int]) -> Tensor | None:
            nonlocal biased
            bias, outputs = backbone_hook(tokens, hw)
            adapt.update(outputs)
            biased = biased or bias is not None
            return bias

        with _part("tmtseg.backbone"):
            hook = attn_hook if backbone_hook is not None else None
            at = getattr(hooks, "backbone_at", None)
            bb = self.backbone(x, attn_hook=hook, vit_tokens=vit_tokens, **({"hook_at": at} if at else {}))
        with _part("tmtseg.pixel_decoder"):
            pix = self.pixel_decoder(bb["pyramid"])
        features = {
            "tokens": bb["tokens"],
            "tokens_hw": bb["tokens_hw"],
            "tokens_biased": biased,  # whether a hook's attention bias changed the ViT's tokens
            "multi_scale": pix["multi_scale"],
            "mask_features_padded": pix["mask_features"],  # [B, Cm, H'/4, W'/4]: what the decoder uses
            "mask_features": pix["mask_features"][..., : -(-H // 4), : -(-W // 4)],  # [B, Cm, ceil(H/4), ceil(W/4)]
            "backbone": bb["pyramid"],
            "adapt": adapt,
        }
        pixel_hook = hooks.pixel_features if hooks is not None else None
        if pixel_hook is not None:
            adapt.update(pixel_hook(features))
        return features

    def forward(
        self,
        images: Tensor,
        *,
        hooks: SegmenterHooks | None = None,
        return_attn: bool = False,
        vit_tokens: tuple[Tensor, tuple] | None = None,
    ) -> dict:
        """images: uint8 or float [B, 3, H, W] in 0-255, any H and W (see the class docstring for the output dict);
        vit_tokens: the ViT's output (tokens, hw) on these images, computed elsewhere, instead of running the ViT."""
        H, W = images.shape[-2:]
        h4, w4 = -(-H // 4), -(-W // 4)
        features = self.encode(images, hooks=hooks, vit_tokens=vit_tokens)
        decoder_hook = hooks.decoder_attn if hooks is not None else None
        adapt = features["adapt"]
        with _part("tmtseg.decoder"):
            dec = self.decoder(
                features["multi_scale"],
                features.pop("mask_features_padded"),
                attn_hook=(lambda layer, prev, hw: decoder_hook(layer, prev, hw, adapt)) if decoder_hook else None,
                return_attn=return_attn,
                # inference (eval mode, no gradients): the last layer's masks only (mask_decoder.py's fast path); a
                # loss computed in eval mode with gradients (the pinned losses) still sees every layer's
                all_predictions=self.training or torch.is_grad_enabled(),
            )
        preds = [
            {"pred_logits": p["pred_logits"], "pred_masks": p["pred_masks"][..., :h4, :w4]}  # [B, Q, H/4, W/4]
            for p in dec["predictions"]
        ]
        out = {**preds[-1], "aux_outputs": preds[:-1], "features": features, "adapt": adapt}
        if return_attn:
            out.update(attn=dec["attn"], attn_masks=dec["attn_masks"], attn_hw=dec["attn_hw"])
        return out

    @torch.no_grad()
    def prior(self, images: Tensor) -> dict:
        """The model's own prediction without any hook, on the padded grid (pred_logits [B, Q, K+1], pred_masks
        [B, Q, H'/4, W'/4], detached): what an attention bias inside the ViT reads its uncertainty U from (TMA in the
        ViT, tmtseg/adapt/attention.py), since the prediction it would bias does not exist yet."""
        with eval_mode(self), _part("tmtseg.prior"):  # deterministic: no dropout or drop-path in what U is read from
            out = self.forward(images)
        H, W = images.shape[-2:]
        masks = out["pred_masks"]  # [B, Q, ceil(H/4), ceil(W/4)]
        pad = (0, _padded(W) // 4 - masks.shape[-1], 0, _padded(H) // 4 - masks.shape[-2])
        return {"pred_logits": out["pred_logits"], "pred_masks": F.pad(masks, pad, mode="replicate")}
