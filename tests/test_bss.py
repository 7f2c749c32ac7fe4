"""BSS (Chen et al., 2019), the method added through the registry alone: its term, its gradient, its settings."""

import pytest
import torch

from tmtseg.adapt.base import StepPasses
from tmtseg.adapt.bss import BSS
from tmtseg.adapt.build import build_model_with_loss
from tmtseg.adapt.registry import METHODS, REGULARISERS, SECTIONS
from tmtseg.config import load_config
from tmtseg.errors import ConfigError

from .tiny import TINY


class _Method:
    labelled_domain = "target"


def _passes(feats: torch.Tensor) -> StepPasses:
    return StepPasses(model=None, method=_Method(), passes={"target": (None, {"features": {"mask_features": feats}})})


def test_the_term_is_the_smallest_squared_singular_values_of_each_images_pixels():
    torch.manual_seed(0)
    feats = torch.randn(2, 6, 4, 5)  # [B, C, h, w]: 20 pixels of 6 channels per image
    got = BSS(weight=0.5, k=2).loss(_passes(feats))
    expected = 0
    for f in feats:
        rows = f.reshape(6, -1).T / 20**0.5  # [P, C]
        sigma = torch.linalg.svdvals(rows)  # descending
        expected += (sigma[-2:] ** 2).sum() / 2
    torch.testing.assert_close(got, 0.5 * expected)


def test_its_gradient_shrinks_the_smallest_singular_value():
    torch.manual_seed(1)
    feats = torch.randn(1, 4, 6, 6, requires_grad=True)
    bss = BSS(weight=1.0, k=1)
    before = torch.linalg.svdvals(feats.detach().flatten(2)[0].T)[-1]
    bss.loss(_passes(feats)).backward()
    with torch.no_grad():
        # d(sigma^2 / P) / dF = 2 sigma u v^T / P: a step of P / 4 halves the smallest singular value, nothing else
        moved = feats - 9.0 * feats.grad
    after = torch.linalg.svdvals(moved.flatten(2)[0].T)[-1]
    assert float(after) == pytest.approx(0.5 * float(before), rel=1e-3)
    largest = torch.linalg.svdvals(feats.detach().flatten(2)[0].T)[0]
    assert torch.linalg.svdvals(moved.flatten(2)[0].T)[0] == pytest.approx(float(largest), rel=1e-3)


def test_bss_is_a_method_a_term_for_others_and_a_validated_section():
    assert "bss" in METHODS and "bss" in REGULARISERS and "bss" in SECTIONS
    model = build_model_with_loss(load_config([], [*TINY, "adapt.method=bss"]))
    assert list(model.method.regularisers) == ["bss"] and not model.method.wants_teacher
    given = build_model_with_loss(load_config([], [*TINY, "adapt.method=tmt", "adapt.bss.methods=[tmt]"]))
    assert "bss" in given.method.regularisers
    off = build_model_with_loss(load_config([], [*TINY, "adapt.method=bss", "adapt.bss.weight=0"]))
    assert not off.method.regularisers
    with pytest.raises(ConfigError, match="adapt.bss.k"):
        load_config([], [*TINY, "adapt.bss.k=0"])
    with pytest.raises(ConfigError, match=r"adapt.bss.methods"):
        load_config([], [*TINY, "adapt.bss.methods=[nope]"])
