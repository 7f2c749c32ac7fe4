"""Domain alignment pieces (the Aligner contract of tmtseg/adapt/base.py): DANN's image level, TVT's patch level and
ACTE's region level (docs/method.md §4, §6). Each is the discriminator module itself, so that checkpoint keys stay
`method.<name>.*`; `read` gives its outputs to the segmenter's `adapt` dict, `loss` turns two batches' into its
adversarial loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tmtseg.adapt.acte import ACTE
from tmtseg.adapt.domain import Discriminator, domain_bce, grad_reverse
from tmtseg.errors import ConfigError


def _two_domain_bce(key: str, labelled: dict, unlabelled: dict, labelled_is_source: bool) -> Tensor:
    return domain_bce(labelled[key], labelled_is_source) + domain_bce(unlabelled[key], not labelled_is_source)


class ImageAlignment(Discriminator):
    """Image level (DANN; TVT's global term): one discriminator, behind a GRL, on the mean backbone token."""

    key = "image_logits"
    site = "pixel_features"

    def read(self, features: dict, *, grl: Tensor | None) -> dict:
        if grl is None:
            return {}
        pooled = features["tokens"].mean(1)  # [B, N, C] -> [B, C]
        return {self.key: self(grad_reverse(pooled, grl))}  # [B]

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return _two_domain_bce(self.key, labelled, unlabelled, labelled_is_source)

    def transfer_map(self, adapt: dict, hw: tuple[int, int]) -> None:  # noqa: ARG002
        return None


class PatchAlignment(Discriminator):
    """Patch level (TVT-style): a discriminator, behind a GRL, on each input token of the last ViT block."""

    key = "patch_logits"
    site = "vit_tokens"

    def read(self, tokens: Tensor, *, grl: Tensor | None, hw: tuple[int, int] | None = None) -> dict:  # noqa: ARG002
        x = tokens if grl is None else grad_reverse(tokens, grl)
        return {self.key: self(x)}  # [B, N, C] -> [B, N]

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return _two_domain_bce(self.key, labelled, unlabelled, labelled_is_source)

    def transfer_map(self, adapt: dict, hw: tuple[int, int]) -> None:  # noqa: ARG002
        return None


class RegionAlignment(ACTE):
    """Region level (ACTE, docs/method.md §4) on one pixel-decoder map; its map T(p) feeds TMA and the KL weights."""

    key = "acte"
    site = "pixel_features"

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

    def read(self, features: dict, *, grl: Tensor | None) -> dict:
        return {self.key: self(self.feature_map(features), grl_coeff=grl)}

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        return ACTE.loss(labelled[self.key], labelled_is_source) + ACTE.loss(
            unlabelled[self.key], not labelled_is_source
        )

    def image_map(self, adapt: dict, hw: tuple[int, int]) -> Tensor:
        """T [B, 1, h', w'] cut to the image whose pred_masks grid is hw (the map covers the padded grid)."""
        s = self.feature_stride
        return adapt[self.key]["tmap"][..., : -(-hw[0] * 4 // s), : -(-hw[1] * 4 // s)]

    def transfer_map(self, adapt: dict, hw: tuple[int, int]) -> Tensor | None:
        return self.image_map(adapt, hw) if self.key in adapt else None


class TokenRegionAlignment(RegionAlignment):
    """ACTE inside the ViT (TMT as the paper's latest abstract places it, docs/method.md §5): the regions and their
    transferability from the tokens entering ViT block `read` (before the blocks TMA biases, so that T comes from
    features the bias does not yet change), on the token grid. The tokens are layer-normalised (no affine) first: the
    ViT's residual stream has a few channels of very large norm, which would decide the clustering alone."""

    site = "vit_tokens"

    def __init__(self, *, vit_at: tuple[int, int, int], **acte):
        super().__init__(feature_stride=16, features="vit", **acte)
        self.vit_at = vit_at

    def read(self, tokens: Tensor, *, grl: Tensor | None, hw: tuple[int, int] | None = None) -> dict:
        x = F.layer_norm(tokens, tokens.shape[-1:])  # [B, N, C]
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, *hw)  # [B, C, h, w]
        return {self.key: self(grid, grl_coeff=grl)}


# ------------------------------------------------------------------------------------- builders: the config readers


def _disc(cfg) -> dict:
    return dict(in_dim=cfg.model.backbone.embed_dim, hidden=cfg.adapt.disc.hidden, dropout=cfg.adapt.disc.dropout)


def build_image(cfg) -> ImageAlignment:
    return ImageAlignment(**_disc(cfg))


def build_patch(cfg) -> PatchAlignment:
    return PatchAlignment(**_disc(cfg))


def build_region(cfg) -> RegionAlignment:
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


def vit_blocks(cfg) -> tuple[int, int, int]:
    """(read, start, pool) of TMA in the ViT: the first of the last adapt.tma.vit_blocks blocks (0 = all) takes the
    bias; ACTE reads the input of block adapt.acte.vit_block (-1 = that first biased block), pooled with the inputs
    of the adapt.acte.vit_pool - 1 blocks after it."""
    depth, k, pool = cfg.model.backbone.depth, cfg.adapt.tma.vit_blocks, cfg.adapt.acte.vit_pool
    start = depth - k if 0 < k <= depth else 0
    read = start if cfg.adapt.acte.vit_block < 0 else cfg.adapt.acte.vit_block
    if read > start:
        raise ConfigError(
            f"config key adapt.acte.vit_block={read}: must be -1 or at most the first biased block ({start}): T must"
            " come from tokens the bias does not change"
        )
    if read + pool - 1 > start:
        raise ConfigError(
            f"config key adapt.acte.vit_pool={pool}: the inputs of blocks {read}..{read + pool - 1} pass the first"
            f" biased block ({start}): at most {start - read + 1} from block {read}"
        )
    return read, start, pool


def build_token_region(cfg) -> TokenRegionAlignment:
    a = cfg.adapt
    return TokenRegionAlignment(
        vit_at=vit_blocks(cfg),
        in_dim=cfg.model.backbone.embed_dim,
        cell=a.acte.cell,
        iters=a.acte.iters,
        kappa=a.acte.kappa,
        disc_hidden=a.disc.hidden,
        disc_dropout=a.disc.dropout,
    )
