"""Gradient reversal, GRL ramp, binary entropy, discriminator and domain BCE (docs/method.md §4, §6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tmtseg.adapt.domain import Discriminator, binary_entropy_bits, domain_bce, grad_reverse, grl_coeff


@pytest.mark.parametrize("coeff", [1.0, 0.3, 0.0])
def test_grad_reverse_is_identity_forward_and_flips_scaled_gradient(coeff):
    x = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    y = grad_reverse(x, coeff)
    torch.testing.assert_close(y, x)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, -coeff * upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_reverse_with_a_tensor_coeff_is_bitwise_the_float_one(dtype):
    """The ramp's coefficient comes as a 0-d tensor (a compiled model reads it as an input); the reversed gradient is
    exactly what the plain `-coeff * grad` with a Python float gives, in bf16 too."""
    g = torch.Generator().manual_seed(0)
    for step in range(0, 100, 7):
        coeff = grl_coeff(step, 100)
        upstream = (torch.randn(512, generator=g) * 10 ** torch.randn(512, generator=g)).to(dtype)
        x = torch.randn(512, dtype=dtype, requires_grad=True)
        grad_reverse(x, torch.tensor(coeff, dtype=torch.float32)).backward(upstream)
        assert x.grad.dtype == dtype and torch.equal(x.grad, -coeff * upstream), step


def test_grl_coeff_ramp():
    assert grl_coeff(0, 100) == 0.0
    assert grl_coeff(100, 100) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coeff(100, 100) > 0.9999
    assert grl_coeff(50, 100) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    values = [grl_coeff(i, 100) for i in range(0, 101, 5)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert grl_coeff(500, 100) == grl_coeff(100, 100)  # past max_iter the ramp stays at its end


def test_binary_entropy_bits():
    p = torch.tensor([0.0, 1e-9, 0.2, 0.5, 0.8, 1.0 - 1e-9, 1.0], requires_grad=True)
    h = binary_entropy_bits(p)
    assert h[3].item() == pytest.approx(1.0)
    assert h[2].item() == pytest.approx(-(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8)), rel=1e-5)
    torch.testing.assert_close(h[2], h[4])  # symmetric
    assert h[[0, 1, 5, 6]].max().item() < 1e-4
    assert h.min().item() >= 0.0 and h.max().item() <= 1.0 + 1e-6
    h.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_discriminator_shapes_and_gradients():
    disc = Discriminator(in_dim=6, hidden=16, dropout=0.1)
    assert sum(isinstance(m, torch.nn.Linear) for m in disc.modules()) == 3
    assert any(isinstance(m, torch.nn.Dropout) for m in disc.modules())
    x = torch.randn(2, 7, 6)
    out = disc(x)
    assert out.shape == (2, 7)
    assert disc(torch.randn(4, 6)).shape == (4,)
    out.sum().backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    disc.eval()
    torch.testing.assert_close(disc(x), disc(x))  # dropout off in eval


def test_domain_bce_labels_and_weights():
    logits = torch.randn(2, 5)
    torch.testing.assert_close(domain_bce(logits, True), F.binary_cross_entropy_with_logits(logits, torch.ones(2, 5)))
    torch.testing.assert_close(domain_bce(logits, False), F.binary_cross_entropy_with_logits(logits, torch.zeros(2, 5)))
    # per-image labels broadcast over the trailing dim
    labels = torch.tensor([True, False])
    expected = F.binary_cross_entropy_with_logits(logits, labels[:, None].float().expand(2, 5))
    torch.testing.assert_close(domain_bce(logits, labels), expected)
    # mass-weighted mean: sum(w * bce) / sum(w); zero weight removes an element
    weight = torch.rand(2, 5) + 0.1
    bce = F.binary_cross_entropy_with_logits(logits, torch.ones(2, 5), reduction="none")
    torch.testing.assert_close(domain_bce(logits, True, weight), (weight * bce).sum() / weight.sum())
    weight[0] = 0.0
    torch.testing.assert_close(domain_bce(logits, True, weight), (weight[1] * bce[1]).sum() / weight[1].sum())


def test_domain_bce_is_minimised_by_the_right_label():
    confident_source = torch.full((3,), 8.0)
    assert domain_bce(confident_source, True) < 1e-3
    assert domain_bce(confident_source, False) > 7.0


def test_binary_entropy_is_finite_for_bf16_inputs():
    p = torch.tensor([0.0, 0.5, 0.999, 1.0], dtype=torch.bfloat16)
    h = binary_entropy_bits(p)
    assert torch.isfinite(h).all() and h[1].item() == pytest.approx(1.0)
