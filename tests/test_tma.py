"""TMA (docs/method.md §5): importance W from transferability and uncertainty, and the per-head attention terms."""

import math

import pytest
import torch

from tmtseg.adapt.tma import TMA
from tmtseg.errors import ConfigError

HEADS = 4


def _tma(**overrides):
    args = dict(
        num_heads=HEADS,
        alpha=0.5,
        combine="mix",
        uncertainty=True,
        form="additive",
        learn_lambda=True,
        lambda_init=0.0,
        eps=1e-6,
    )
    args.update(overrides)
    return TMA(**args)


def _random_prev(b=2, q=5, k=3, h=8, w=12):
    return {"pred_logits": torch.randn(b, q, k + 1), "pred_masks": 3 * torch.randn(b, q, h, w)}


def _half_certain_prev(h=8, w=12, k=3):
    """Query i predicts class i. Left half: only query 0's mask is on (certain, U ~ 0); right half:
    every mask is at sigmoid 0.5, so the classes are equally likely (U = 1)."""
    logits = torch.full((1, k, k + 1), -30.0)
    logits[0, torch.arange(k), torch.arange(k)] = 30.0
    masks = torch.zeros(1, k, h, w)
    masks[0, :, :, : w // 2] = -30.0
    masks[0, 0, :, : w // 2] = 30.0
    return {"pred_logits": logits, "pred_masks": masks}


def test_uncertainty_is_normalised_entropy_and_detached():
    tma = _tma()
    prev = _half_certain_prev()
    prev["pred_masks"].requires_grad_(True)
    u = tma.uncertainty(prev, (8, 12))
    assert u.shape == (1, 1, 8, 12) and not u.requires_grad
    assert u[..., :6].max() < 1e-4
    torch.testing.assert_close(u[..., 6:], torch.ones(1, 1, 8, 6))
    u = tma.uncertainty(_random_prev(), (8, 12))
    assert u.min() >= 0 and u.max() <= 1
    # at a coarser attention resolution: the entropy of the mask logits resized there (as the attention mask is)
    coarse = tma.uncertainty(prev, (4, 6))
    assert coarse.shape == (1, 1, 4, 6)
    assert coarse[..., :2].max() < 1e-4 and coarse[..., 4:].min() > 0.999


def test_uncertainty_matches_a_per_pixel_reference():
    prev = _random_prev(b=1, q=4, k=3, h=2, w=3)
    u = _tma().uncertainty(prev, (2, 3))
    cls = prev["pred_logits"][0].softmax(-1)[:, :-1]  # [Q, K]
    for y in range(2):
        for x in range(3):
            scores = (cls * prev["pred_masks"][0, :, y, x].sigmoid()[:, None]).sum(0)  # [K]
            p = scores / scores.sum()
            assert u[0, 0, y, x].item() == pytest.approx(float(-(p * p.log()).sum() / math.log(3)), abs=1e-5)


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
@pytest.mark.parametrize("combine", ["mix", "product"])
def test_lambda_zero_is_exactly_vanilla(form, combine):
    tma = _tma(form=form, combine=combine)
    tmap = torch.rand(2, 1, 16, 24)
    tmap[0, 0, :4] = 1.0  # W = 0 there: log(eps + 0) must still give an exact 0 bias
    bias, scale = tma.attn_terms(tmap, _random_prev(), (4, 6))
    if form == "additive":
        assert scale is None and bias.shape == (2, HEADS, 24)
        assert torch.equal(bias, torch.zeros_like(bias))
    else:
        assert bias is None and scale.shape == (2, HEADS, 24)
        assert torch.equal(scale, torch.ones_like(scale))


def test_importance_bounds_and_resizing():
    tma = _tma()
    for tmap in (torch.rand(2, 1, 16, 24), torch.zeros(2, 1, 16, 24), torch.ones(2, 1, 16, 24)):
        w = tma.importance(tmap, _random_prev(), (4, 6))
        assert w.shape == (2, 1, 4, 6)
        assert w.min() >= 0 and w.max() <= 1
    # a constant map stays constant through the resize
    w = _tma(uncertainty=False).importance(torch.full((1, 1, 16, 24), 0.3), _random_prev(b=1), (2, 3))
    torch.testing.assert_close(w, torch.full((1, 1, 2, 3), 0.7))


def test_mix_product_and_uncertainty_off():
    prev = _half_certain_prev()
    tmap = torch.rand(1, 1, 8, 12)
    hw = (8, 12)  # the resolution of both maps: no resizing
    u = torch.zeros(1, 1, 8, 12)
    u[..., 6:] = 1.0
    low_t = 1.0 - tmap
    mix = _tma(alpha=0.3).importance(tmap, prev, hw)
    torch.testing.assert_close(mix, 0.3 * low_t + 0.7 * u, atol=1e-4, rtol=0)
    product = _tma(combine="product").importance(tmap, prev, hw)
    torch.testing.assert_close(product, low_t * u, atol=1e-4, rtol=0)
    off = _tma(uncertainty=False).importance(tmap, prev, hw)
    torch.testing.assert_close(off, low_t)
    # low transferability and high uncertainty are where the weight goes
    assert mix[..., 6:].mean() > mix[..., :6].mean()


def test_lambda_one_gives_log_w_and_w():
    tmap, prev, hw = torch.rand(1, 1, 8, 12), _random_prev(b=1), (8, 12)
    w = _tma(lambda_init=1.0).importance(tmap, prev, hw).flatten(2)  # [B, 1, N]
    bias, _ = _tma(lambda_init=1.0).attn_terms(tmap, prev, hw)
    torch.testing.assert_close(bias, torch.log(1e-6 + w).expand(1, HEADS, 96))
    assert torch.isfinite(bias).all()
    _, scale = _tma(lambda_init=1.0, form="multiplicative").attn_terms(tmap, prev, hw)
    torch.testing.assert_close(scale, w.expand(1, HEADS, 96))


def test_zscore_bias_is_lambda_times_the_standardised_importance():
    tmap, prev, hw = torch.rand(2, 1, 8, 12), _random_prev(), (8, 12)
    tma = _tma(lambda_init=2.0, normalize="zscore")
    w = tma.importance(tmap, prev, hw).flatten(2)  # [B, 1, N]
    bias, scale = tma.attn_terms(tmap, prev, hw)
    assert scale is None and bias.shape == (2, HEADS, 96)
    torch.testing.assert_close(bias.mean(-1), torch.zeros(2, HEADS), atol=1e-5, rtol=0)
    torch.testing.assert_close(bias.std(-1), torch.full((2, HEADS), 2.0), atol=1e-3, rtol=0)
    # the same ordering of keys as the log form: more importance, more attention
    log_bias, _ = _tma(lambda_init=2.0).attn_terms(tmap, prev, hw)
    assert torch.equal(bias[0, 0].argsort(), log_bias[0, 0].argsort()) or torch.equal(
        bias[0, 0].argmax(), log_bias[0, 0].argmax()
    )
    assert torch.equal(bias[0, 0].argmax(), w[0, 0].argmax())
    # a near-flat W (T ~ 0.99 everywhere) still moves attention by lambda standard deviations
    flat = 0.99 + 0.001 * torch.rand(1, 1, 8, 12)
    z, _ = _tma(lambda_init=1.0, normalize="zscore", uncertainty=False).attn_terms(flat, _random_prev(b=1), hw)
    log, _ = _tma(lambda_init=1.0, uncertainty=False).attn_terms(flat, _random_prev(b=1), hw)
    assert z.max() - z.min() > 2.0 and log.max() - log.min() < 0.2


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
def test_gradient_reaches_every_lambda(form):
    tma = _tma(form=form)
    bias, scale = tma.attn_terms(torch.rand(2, 1, 16, 24), _random_prev(), (4, 6))
    term = bias if form == "additive" else scale
    (term * torch.randn_like(term)).sum().backward()
    assert tma.lambdas.grad is not None and (tma.lambdas.grad != 0).all()


def test_fixed_lambda_is_a_buffer():
    tma = _tma(learn_lambda=False, lambda_init=0.5)
    assert list(tma.parameters()) == []
    assert "lambdas" in tma.state_dict()
    torch.testing.assert_close(tma.lambdas, torch.full((HEADS,), 0.5))


def test_bad_choices_raise():
    with pytest.raises(ConfigError):
        _tma(combine="sum")
    with pytest.raises(ConfigError):
        _tma(form="gated")
    with pytest.raises(ConfigError):
        _tma(normalize="rank")
