"""Segmenter shapes, gradients and hooks on a tiny CPU config (docs/method.md §3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tmtseg.config import Config, load_config
from tmtseg.errors import ConfigError
from tmtseg.losses.criterion import semantic_targets
from tmtseg.modeling.build import build_criterion, build_model
from tmtseg.modeling.layers import MLP, attention, sine_position_encoding
from tmtseg.modeling.pixel_decoders.msdeform_attn import ms_deform_attn_core

from .tiny import TINY

K, Q, HEADS, LAYERS = 5, 8, 2, 3


def tiny_cfg(pixel_decoder: str = "fpn") -> Config:
    cfg = Config()
    b = cfg.model.backbone
    b.embed_dim, b.depth, b.num_heads, b.patch_size, b.img_size = 64, 2, 2, 16, 64
    m = cfg.model
    m.pixel_decoder, m.conv_dim, m.mask_dim, m.hidden_dim = pixel_decoder, 32, 32, 32
    m.num_queries, m.nheads, m.dec_layers, m.dim_feedforward, m.enc_layers = Q, HEADS, LAYERS, 64, 1
    cfg.data.num_classes = K
    cfg.loss.num_points = 64
    return cfg


def tiny_model(pixel_decoder: str = "fpn", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(pixel_decoder)).eval()


def images(b: int = 2, h: int = 64, w: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("pixel_decoder", ["fpn", "msdeform"])
def test_output_contract_shapes(pixel_decoder):
    model = tiny_model(pixel_decoder)
    assert model.num_classes == K
    with torch.no_grad():
        out = model(images(), return_attn=True)
    assert out["pred_logits"].shape == (2, Q, K + 1)
    assert out["pred_masks"].shape == (2, Q, 16, 24)
    assert out["aux_outputs"] == []  # inference: the decoder's fast path keeps the last layer's prediction only
    assert len(model(images())["aux_outputs"]) == LAYERS  # eval with gradients (a loss in eval mode): every layer's
    aux_outputs = model.train()(images())["aux_outputs"]  # train: deep supervision's
    assert len(aux_outputs) == LAYERS  # before layer 0 and after every layer but the last
    for aux in aux_outputs:
        assert aux["pred_logits"].shape == (2, Q, K + 1) and aux["pred_masks"].shape == (2, Q, 16, 24)
    f = out["features"]
    assert f["tokens"].shape == (2, 4 * 6, 64) and f["tokens_hw"] == (4, 6)
    assert [tuple(x.shape) for x in f["multi_scale"]] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    assert f["mask_features"].shape == (2, 32, 16, 24)
    assert {s: tuple(x.shape[-2:]) for s, x in f["backbone"].items()} == {
        4: (16, 24),
        8: (8, 12),
        16: (4, 6),
        32: (2, 3),
    }
    assert out["attn_hw"] == [(2, 3), (4, 6), (8, 12)]  # round-robin 1/32, 1/16, 1/8
    for a, m, (h, w) in zip(out["attn"], out["attn_masks"], out["attn_hw"], strict=True):
        assert a.shape == (2, HEADS, Q, h * w) and m.shape == (2, Q, h * w) and m.dtype == torch.bool
        torch.testing.assert_close(a.sum(-1), torch.ones(2, HEADS, Q))
        assert not m.all(-1).any()  # a query with an empty mask attends everywhere
    tensors = [out["pred_logits"], out["pred_masks"], f["tokens"], f["mask_features"], *f["multi_scale"], *out["attn"]]
    assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("pixel_decoder", ["fpn", "msdeform"])
def test_every_parameter_gets_a_gradient(pixel_decoder):
    cfg = tiny_cfg(pixel_decoder)
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    if pixel_decoder == "msdeform":
        # Deformable DETR zero-inits the offset/weight projections, which makes the level embedding's first gradient
        # exactly 0; perturb them so that the test sees every path
        for layer in model.pixel_decoder.layers:
            torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.01)
            torch.nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.01)
    labels = torch.randint(0, K, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    labels[:, :8] = 255
    targets = [semantic_targets(lab, num_classes=K, ignore_index=255) for lab in labels]
    losses = criterion(model(images()), targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("size", [(37, 53), (64, 33), (100, 64)])
def test_odd_sizes_crop_to_ceil_quarter(size):
    model = tiny_model()
    H, W = size
    out = model(images(1, H, W).float())
    h4, w4 = math.ceil(H / 4), math.ceil(W / 4)
    assert out["pred_masks"].shape == (1, Q, h4, w4)
    assert out["features"]["mask_features"].shape[-2:] == (h4, w4)
    assert torch.isfinite(out["pred_masks"]).all()


def test_uint8_and_float_inputs_agree_and_train_eval_same_keys():
    model = tiny_model()
    x = images()
    a, b = model(x), model(x.float())
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"])
    assert set(model.train()(x)) == set(a)
    assert not {"pixel_mean", "pixel_std"} & set(model.state_dict())  # non-persistent buffers


class Hooks:
    """A configurable test double of the adaptation methods' hooks; records what it was called with."""

    def __init__(self, *, bias=None, scale=None, backbone=None):
        self.bias_fn, self.scale_fn, self.backbone_fn = bias, scale, backbone
        self.calls, self.features = [], None

    def decoder_attn(self, layer, prev, hw, adapt):  # noqa: ARG002
        self.calls.append((layer, {k: v.clone() for k, v in prev.items()}, hw))
        B = prev["pred_logits"].shape[0]
        bias = None if self.bias_fn is None else self.bias_fn(B, hw)
        scale = None if self.scale_fn is None else self.scale_fn(B, hw)
        return bias, scale

    def pixel_features(self, features):
        self.features = features
        return {"pixel": 1}

    def backbone_attn(self, tokens, hw):
        return (None if self.backbone_fn is None else self.backbone_fn(tokens, hw)), {"backbone": 1}


def test_zero_bias_unit_scale_and_none_hooks_change_nothing():
    model = tiny_model()
    x = images()
    ref = model(x, return_attn=True)
    zero = Hooks(bias=lambda B, hw: torch.zeros(B, HEADS, hw[0] * hw[1]))
    unit = Hooks(scale=lambda B, hw: torch.ones(B, HEADS, hw[0] * hw[1]))
    nothing = Hooks(backbone=lambda tokens, hw: torch.zeros(tokens.shape[0], 1, tokens.shape[1]))
    # every hook point declared None (the SegmenterHooks contract: an unused hook point is None, never absent)
    absent = SimpleNamespace(backbone_attn=None, pixel_features=None, decoder_attn=None)
    for hooks in (zero, unit, nothing, absent):
        out = model(x, hooks=hooks, return_attn=True)
        torch.testing.assert_close(out["pred_masks"], ref["pred_masks"])
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"])
        for a, b in zip(out["attn"], ref["attn"], strict=True):
            torch.testing.assert_close(a, b)


def test_hooks_see_previous_prediction_features_and_hw():
    model = tiny_model().train()  # dropout 0: train mode computes what eval does, and returns aux_outputs
    hooks = Hooks()
    out = model(images(), hooks=hooks)
    assert [c[0] for c in hooks.calls] == list(range(LAYERS))
    assert [c[2] for c in hooks.calls] == [(2, 3), (4, 6), (8, 12)]
    for (_, prev, _), aux in zip(hooks.calls, out["aux_outputs"], strict=True):
        torch.testing.assert_close(prev["pred_logits"], aux["pred_logits"])
        torch.testing.assert_close(prev["pred_masks"], aux["pred_masks"])  # 64x96 needs no padding
    assert hooks.features is not None and set(hooks.features) == set(out["features"])
    assert out["adapt"] == out["features"]["adapt"] == {"backbone": 1, "pixel": 1}  # what the hooks returned
    # eval with gradients (a loss computed in eval mode): every layer's previous prediction at full size, as in training
    slow = Hooks()
    model.eval()(images(), hooks=slow)
    for (_, prev, _), (_, full, _) in zip(slow.calls, hooks.calls, strict=True):
        torch.testing.assert_close(prev["pred_masks"], full["pred_masks"])
    # eval without gradients (the fast path): the same previous predictions, made at the attention size of the layer
    # they feed
    fast = Hooks()
    with torch.no_grad():
        model(images(), hooks=fast)
    for (_, prev, hw), (_, full, _) in zip(fast.calls, hooks.calls, strict=True):
        assert prev["pred_masks"].shape[-2:] == hw
        resized = F.interpolate(full["pred_masks"], size=hw, mode="bilinear", align_corners=False)
        torch.testing.assert_close(prev["pred_masks"], resized, atol=1e-5, rtol=0)
        torch.testing.assert_close(prev["pred_logits"], full["pred_logits"])


def test_large_negative_bias_silences_keys_and_masked_keys_stay_masked():
    model = tiny_model()

    def bias(B, hw):
        b = torch.zeros(B, HEADS, hw[0] * hw[1])
        b[..., : hw[0] * hw[1] // 2] = -1e4  # the first half of the keys
        b[:, 0, -1] = 5.0  # a positive bias must not un-mask a masked key either
        return b

    out = model(images(), hooks=Hooks(bias=bias), return_attn=True)
    checked = 0
    for a, m in zip(out["attn"], out["attn_masks"], strict=True):
        n = a.shape[-1]
        assert (a.masked_select(m[:, None].expand_as(a)) == 0).all()  # -inf entries stay -inf
        # rows with an unmasked key in the unbiased half: the biased half gets ~0 probability
        rows = (~m[:, :, n // 2 :]).any(-1)[:, None].expand(-1, HEADS, -1)  # [B, h, Q]
        assert (a[..., : n // 2][rows] < 1e-6).all()
        checked += int(rows.sum())
    assert checked > 0


def test_scale_multiplies_probabilities_without_renormalising():
    model = tiny_model()
    out = model(images(), hooks=Hooks(scale=lambda B, hw: torch.full((B, HEADS, hw[0] * hw[1]), 0.5)), return_attn=True)
    for a, m in zip(out["attn"], out["attn_masks"], strict=True):
        torch.testing.assert_close(a.sum(-1), torch.full(a.shape[:-1], 0.5))
        assert (a.masked_select(m[:, None].expand_as(a)) == 0).all()


def test_backbone_hook_bias_reaches_the_last_block():
    model = tiny_model()
    x = images()
    seen = []

    def silence(tokens, hw):
        seen.append((tuple(tokens.shape), hw))
        b = torch.zeros(tokens.shape[0], HEADS, tokens.shape[1])
        b[..., 1:] = -1e4  # every patch key but the first
        return b

    a = model(x)["features"]["tokens"]
    b = model(x, hooks=Hooks(backbone=silence))["features"]["tokens"]
    assert seen == [((2, 24, 64), (4, 6))]
    assert not torch.allclose(a, b, atol=1e-3)


def test_attention_manual_path_equals_sdpa():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    bias = torch.randn(2, 2, 5, 7)
    k, v = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    bias[..., 0] = float("-inf")
    fused, none = attention(q, k, v, bias=bias)
    manual, probs = attention(q, k, v, bias=bias, return_probs=True)
    assert none is None
    torch.testing.assert_close(fused, manual)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, -1)
    torch.testing.assert_close(probs, ref)


def test_mlp_and_sine_encoding():
    mlp = MLP(4, 8, 3, 3)
    assert len(mlp.layers) == 3 and mlp(torch.randn(2, 5, 4)).shape == (2, 5, 3)
    pos = sine_position_encoding((2, 3, 5), num_feats=8)
    assert pos.shape == (2, 16, 3, 5) and pos.abs().max() <= 1.0
    assert not torch.allclose(pos[:, :, 0], pos[:, :, 1])  # varies along y ...
    assert not torch.allclose(pos[..., 0], pos[..., 1])  # ... and x


def test_ms_deform_attn_core_matches_a_naive_bilinear_loop():
    torch.manual_seed(0)
    shapes = [(2, 3), (4, 5)]
    B, nh, dh, Nq, P = 1, 2, 3, 4, 2
    value = torch.randn(B, sum(h * w for h, w in shapes), nh, dh)
    loc = torch.rand(B, Nq, nh, len(shapes), P, 2)
    weights = torch.rand(B, Nq, nh, len(shapes), P)
    out = ms_deform_attn_core(value, shapes, loc, weights)
    ref = torch.zeros(B, Nq, nh, dh)
    maps = value.split([h * w for h, w in shapes], dim=1)
    for lvl, (h, w) in enumerate(shapes):
        grid = maps[lvl][0].view(h, w, nh, dh)
        for q in range(Nq):
            for head in range(nh):
                for p in range(P):
                    x, y = loc[0, q, head, lvl, p] * torch.tensor([w, h]) - 0.5  # pixel-centre coordinates
                    x0, y0 = math.floor(x), math.floor(y)
                    for yy, xx in [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]:
                        if 0 <= yy < h and 0 <= xx < w:
                            wt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                            ref[0, q, head] += weights[0, q, head, lvl, p] * wt * grid[yy, xx, head]
    torch.testing.assert_close(out, ref.view(B, Nq, nh * dh))


def test_patch_size_without_a_power_of_two_token_stride_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbone.token_stride=0.*patch_size=14"):
        load_config(overrides=[*TINY, "model.backbone.patch_size=14"])
    cfg = load_config(overrides=[*TINY, "model.backbone.patch_size=14", "model.backbone.token_stride=8"])
    out = build_model(cfg).eval()(torch.zeros(1, 3, 50, 70))  # padded to 64x96, the ViT sees 56x84 (patch 14)
    assert out["pred_masks"].shape[-2:] == (13, 18)


def test_padding_does_not_leak_into_cropped_masks():
    # a 64x90 image is padded to 64x96: the cropped masks keep ceil(90/4) = 23 columns of the padded prediction
    model = tiny_model()
    x = images(1, 64, 90)
    out = model(x)
    padded = model(F.pad((x.float() - model.pixel_mean) / model.pixel_std, (0, 6)) * model.pixel_std + model.pixel_mean)
    torch.testing.assert_close(out["pred_masks"], padded["pred_masks"][..., :23])
