"""TMA inside the ViT's self-attention (adapt.tma.where=vit|both, docs/method.md §5): lambda = 0 is the source model,
gradients reach lambda, the bias moves attention toward low-transferability keys, ACTE reads an earlier block or
pools several."""

import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.adapt.registry import recipe_of
from tmtseg.config import load_config
from tmtseg.errors import ConfigError
from tmtseg.modeling.backbones.vit import VisionTransformer

from .tiny import TINY

VIT = [*TINY, "model.backbone.depth=4", "adapt.method=tmt", "adapt.tma.where=vit", "adapt.tma.vit_blocks=2"]


def _images(seed=1, b=2, h=64, w=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _pair(*extra):
    """A TMT-in-ViT trainer and a vanilla one holding the same segmenter weights."""
    torch.manual_seed(0)
    tmt = build_model_with_loss(load_config([], [*VIT, *extra]))
    vanilla = build_model_with_loss(load_config([], [*TINY, "model.backbone.depth=4"]))
    vanilla.model.load_state_dict(tmt.model.state_dict())
    return tmt, vanilla


def test_where_vit_builds_acte_on_tokens_and_tma_in_the_vit():
    tmt, _ = _pair()
    hooks = tmt.method.inference_hooks()
    assert [type(p).__name__ for p in hooks.attention] == ["ViTTMAAttention"]
    assert [type(p).__name__ for p in hooks.align] == ["TokenRegionAlignment"]
    assert hooks.backbone_at == (2, 2, 1) and hooks.needs_prior and hooks.decoder_attn is None
    assert tmt.method.tma.lambdas.shape == (2,)  # one lambda per ViT head
    both = recipe_of(load_config([], [*VIT, "adapt.tma.where=both"]).adapt)
    assert both.attention == (("tma", "tma"), ("tma_vit", "tma_vit")) and both.align == (("acte", "region_vit"),)
    read_early = build_model_with_loss(load_config([], [*VIT, "adapt.acte.vit_block=1"]))
    assert read_early.method.inference_hooks().backbone_at == (1, 2, 1)
    with pytest.raises(ConfigError, match="adapt.acte.vit_block"):
        build_model_with_loss(load_config([], [*VIT, "adapt.acte.vit_block=3"]))
    pooled = build_model_with_loss(load_config([], [*VIT, "adapt.acte.vit_block=0", "adapt.acte.vit_pool=3"]))
    assert pooled.method.inference_hooks().backbone_at == (0, 2, 3)  # the inputs of blocks 0, 1, 2; 2 is biased on
    with pytest.raises(ConfigError, match="adapt.acte.vit_pool=3"):  # block 3 would be past the first biased one
        build_model_with_loss(load_config([], [*VIT, "adapt.acte.vit_block=1", "adapt.acte.vit_pool=3"]))


@pytest.mark.parametrize("extra", [[], ["adapt.tma.uncertainty=false"], ["adapt.tma.normalize=zscore"]])
def test_lambda_zero_reproduces_the_source_model(extra):
    tmt, vanilla = _pair(*extra)
    tmt.eval(), vanilla.eval()
    images = _images()
    with torch.no_grad():
        a = tmt.model(images, hooks=tmt.method.inference_hooks())
        b = vanilla.model(images)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the bias acts once lambda moves
        tmt.method.tma.lambdas.fill_(2.0)
        c = tmt.model(images, hooks=tmt.method.inference_hooks())
    assert (c["pred_masks"] - b["pred_masks"]).abs().max() > 1e-3


def test_gradients_reach_lambda_through_the_vit():
    tmt, _ = _pair("adapt.preserve.weight=0.0")  # the paper's TMT: no KL term, so no source model to load
    batch = {"image": _images(), "label": torch.randint(0, 5, (2, 64, 64), generator=torch.Generator().manual_seed(2))}
    losses = tmt({"labelled": batch, "unlabelled": {"image": _images(3)}}, step=0)
    losses["loss"].backward()
    grad = tmt.method.tma.lambdas.grad
    assert grad is not None and grad.abs().sum() > 0
    disc = [p.grad for p in tmt.method.acte.discriminator.parameters()]
    assert all(g is not None for g in disc) and sum(g.abs().sum() for g in disc) > 0  # ACTE's adversarial loss


def test_the_bias_moves_attention_toward_low_transferability_keys():
    """A constructed case: one block, T = 0 on the left half of the keys and 1 on the right; with lambda > 0 every
    query's attention mass on the left (low-T) keys grows, as TMA is meant to do."""
    torch.manual_seed(0)
    tmt, _ = _pair("adapt.tma.uncertainty=false")
    piece = tmt.method.tma
    h, w = 4, 4
    tmap = torch.ones(1, 1, h, w)
    tmap[..., : w // 2] = 0.0
    from tmtseg.adapt.base import DecoderQuery

    block = VisionTransformer(embed_dim=32, depth=1, num_heads=2, patch_size=8).blocks[0].attn
    x = torch.randn(1, h * w, 32)
    left = torch.arange(h * w).reshape(h, w)[:, : w // 2].flatten()

    def left_mass(lam: float) -> float:
        with torch.no_grad():
            piece.lambdas.fill_(lam)
            bias = piece.bias({"acte": {"tmap": tmap}}, DecoderQuery(-1, None, (h, w)))[0]  # [1, heads, N]
            qkv = block.qkv(x).view(1, h * w, 3, 2, 16).permute(2, 0, 3, 1, 4)
            logits = qkv[0] @ qkv[1].transpose(-1, -2) / 4.0 + bias[:, :, None, :]  # [1, heads, N, N]
            return float(logits.softmax(-1)[..., left].sum(-1).mean())

    assert left_mass(0.0) < left_mass(0.5) < left_mass(1.0)


def test_vit_hook_reads_one_block_and_biases_the_later_ones():
    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=32, depth=4, num_heads=2, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = {}

    def hook(tokens, hw):
        seen["tokens"] = tokens
        return torch.zeros(1, 1, tokens.shape[1])

    plain, _ = vit(x)
    hooked, _ = vit(x, attn_hook=hook, hook_at=(1, 3))
    torch.testing.assert_close(plain, hooked)  # a zero bias changes nothing
    expect, _ = vit.trunk(x, upto=1)
    torch.testing.assert_close(seen["tokens"], expect[:, 1:])  # the input of block 1, prefix removed
    with pytest.raises(ValueError, match="hook_at"):
        vit(x, attn_hook=hook, hook_at=(3, 1))
    # pooled: the mean of the layer-normed inputs of blocks 0, 1 and 2, the output unchanged by a zero bias
    pooled, _ = vit(x, attn_hook=hook, hook_at=(0, 3, 3))
    torch.testing.assert_close(plain, pooled)
    inputs = [vit.trunk(x, upto=b)[0][:, 1:] for b in (0, 1, 2)]
    expect = torch.stack([torch.nn.functional.layer_norm(t, t.shape[-1:]) for t in inputs]).mean(0)
    torch.testing.assert_close(seen["tokens"], expect)
    assert not torch.allclose(seen["tokens"], torch.nn.functional.layer_norm(inputs[0], inputs[0].shape[-1:]))
    with pytest.raises(ValueError, match="hook_at"):
        vit(x, attn_hook=hook, hook_at=(1, 3, 4))  # block 4 does not come before block 3
