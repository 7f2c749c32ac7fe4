"""ACTE (docs/method.md §4): soft clustering on the 3x3 cell neighbourhood, its O(9 P) memory, the
region discriminator behind the GRL and the detached transferability map."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tmtseg.adapt.acte import ACTE, OFFSETS, _neighbours, _scatter_neighbours, soft_cluster
from tmtseg.adapt.domain import domain_bce
from tmtseg.errors import ConfigError


def _dense_assignment(regions, h, w):
    """Reference: the dense [B, P, R] assignment matrix built pixel by pixel (tiny inputs only)."""
    c, (hc, wc) = regions.cell, regions.grid
    dense = torch.zeros(regions.assign.shape[0], h * w, hc * wc, dtype=regions.assign.dtype)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(OFFSETS):
                row, col = y // c + dy, x // c + dx
                if 0 <= row < hc and 0 <= col < wc:
                    dense[:, y * w + x, row * wc + col] += regions.assign[:, k, y, x]
                else:
                    assert (regions.assign[:, k, y, x] == 0).all()  # out-of-grid neighbours get nothing
    return dense


def _two_colour_map(side: torch.Tensor, channels: int = 4, noise: float = 0.05) -> torch.Tensor:
    """Feature map [1, C, H, W] with one unit vector where side is False and an orthogonal one where True."""
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(1, channels, *side.shape)
    x[0, 0] = (~side).float()
    x[0, 1] = side.float()
    return x + noise * torch.randn(x.shape, generator=gen)


def _straddling_regions(ids: torch.Tensor, side: torch.Tensor) -> int:
    return sum(int(side[ids == r].any() and (~side[ids == r]).any()) for r in ids.unique())


@pytest.mark.parametrize("grid", [(5, 7), (1, 1), (2, 1)])
def test_scattering_to_the_neighbours_is_the_adjoint_of_gathering_them(grid):
    """<gather(g), p> = <g, scatter(p)>: what a cell sends to its k-th neighbour region lands on that region, and
    what would land off the grid is dropped (on a 1x1 grid only the centre is kept)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 3, *grid, generator=gen, dtype=torch.float64)
    p = torch.randn(2, 9, 3, *grid, generator=gen, dtype=torch.float64)
    torch.testing.assert_close((_neighbours(g) * p).sum(), (g * _scatter_neighbours(p)).sum())
    if grid == (1, 1):
        assert torch.equal(_scatter_neighbours(p), p[:, OFFSETS.index((0, 0))])


@pytest.mark.parametrize("shape", [(2, 5, 16, 24), (1, 3, 13, 21)])
@pytest.mark.parametrize("iters", [0, 3])
def test_assignments_are_distributions_over_nine_neighbours(shape, iters):
    x = torch.randn(*shape)
    regions = soft_cluster(x, cell=4, iters=iters, kappa=10.0)
    b, ch, h, w = shape
    hc, wc = -(-h // 4), -(-w // 4)
    assert regions.assign.shape == (b, 9, h, w)
    assert regions.features.shape == (b, hc * wc, ch)
    assert regions.mass.shape == (b, hc * wc) and regions.grid == (hc, wc)
    assert regions.region_ids().shape == (b, h, w)
    assert regions.assign.min() >= 0
    torch.testing.assert_close(regions.assign.sum(1), torch.ones(b, h, w))
    torch.testing.assert_close(regions.mass.sum(1), torch.full((b,), float(h * w)))  # padding carries no mass
    assert torch.isfinite(regions.features).all()


def test_zero_iterations_is_the_fixed_grid():
    x = torch.randn(2, 3, 16, 24)
    regions = soft_cluster(x, cell=8, iters=0, kappa=10.0)
    torch.testing.assert_close(regions.features, F.avg_pool2d(x, 8).flatten(2).transpose(1, 2))
    torch.testing.assert_close(regions.mass, torch.full((2, 6), 64.0))
    cell_ids = (torch.arange(16)[:, None] // 8) * 3 + torch.arange(24)[None, :] // 8
    assert torch.equal(regions.region_ids(), cell_ids.expand(2, 16, 24))
    assert torch.equal(regions.assign[:, 4], torch.ones(2, 16, 24))  # one-hot on the own cell


def test_zero_iterations_with_padding_averages_real_pixels_only():
    x = torch.randn(1, 3, 10, 13)
    regions = soft_cluster(x, cell=4, iters=0, kappa=10.0)
    assert regions.grid == (3, 4)
    for row in range(3):
        for col in range(4):
            patch = x[0, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4]
            torch.testing.assert_close(regions.features[0, row * 4 + col], patch.mean((1, 2)))
            assert regions.mass[0, row * 4 + col].item() == patch[0].numel()


@pytest.mark.parametrize("iters", [0, 2])
def test_dense_and_region_means_match_a_dense_matrix_reference(iters):
    x = torch.randn(2, 3, 11, 13)
    regions = soft_cluster(x, cell=4, iters=iters, kappa=5.0)
    dense = _dense_assignment(regions, 11, 13)  # [B, P, R]
    values = torch.randn(2, regions.features.shape[1])
    expected = torch.einsum("bpr,br->bp", dense, values).reshape(2, 1, 11, 13)
    torch.testing.assert_close(regions.dense(values), expected)
    torch.testing.assert_close(regions.mass, dense.sum(1))
    # the region means of the final assignment: f(r) = sum_p a(p, r) x(p) / sum_p a(p, r)
    feats = torch.einsum("bpr,bcp->brc", dense, x.flatten(2)) / dense.sum(1)[..., None]
    torch.testing.assert_close(regions.features, feats)


@pytest.mark.parametrize("boundary", ["vertical", "diagonal"])
def test_regions_follow_a_boundary_that_cuts_through_cells(boundary):
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    side = xs >= 13 if boundary == "vertical" else ys - xs >= 4  # neither falls on the 8-pixel cell borders
    x = _two_colour_map(side)
    fixed = soft_cluster(x, cell=8, iters=0, kappa=10.0)
    assert _straddling_regions(fixed.region_ids()[0], side) > 0  # the fixed grid cuts across the boundary
    adaptive = soft_cluster(x, cell=8, iters=3, kappa=10.0)
    assert _straddling_regions(adaptive.region_ids()[0], side) == 0


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_linear_in_pixels_never_pixels_by_regions():
    channels, cell = 4, 4
    largest = {}
    for size in (64, 128):
        x = torch.randn(1, channels, size, size, requires_grad=True)
        with _LargestTensor() as rec:
            regions = soft_cluster(x, cell=cell, iters=2, kappa=10.0)
            (regions.features.square().sum() + regions.dense(regions.mass).sum()).backward()
        pixels, num_regions = size * size, (size // cell) ** 2
        assert rec.largest <= 9 * pixels * channels < pixels * num_regions
        largest[size] = rec.largest
    # 4x the pixels and 4x the regions: O(9 P) grows 4x, a dense P x R matrix would grow 16x
    assert largest[128] <= 4.5 * largest[64]


def _acte(dropout=0.0, iters=2):
    return ACTE(in_dim=6, cell=4, iters=iters, kappa=10.0, disc_hidden=16, disc_dropout=dropout)


def test_acte_forward_outputs():
    acte = _acte(dropout=0.1)
    x = torch.randn(2, 6, 14, 18, requires_grad=True)
    out = acte(x, grl_coeff=0.5)
    regions = out["regions"]
    assert out["disc_logits"].shape == out["transferability"].shape == (2, 20)
    assert out["tmap"].shape == (2, 1, 14, 18)
    assert not out["tmap"].requires_grad  # an input signal to TMA, not a training path
    t = out["transferability"]
    assert t.min() >= 0 and t.max() <= 1
    assert out["tmap"].min() >= t.min() - 1e-6 and out["tmap"].max() <= t.max() + 1e-6  # convex mixtures of t_r
    torch.testing.assert_close(out["tmap"], regions.dense(t).detach())


def test_every_acte_parameter_and_the_input_get_a_gradient():
    acte = _acte(dropout=0.1)
    x = torch.randn(2, 6, 12, 16, requires_grad=True)
    loss = acte.loss(acte(x, grl_coeff=1.0), True) + acte.loss(acte(x, grl_coeff=1.0), False)
    loss.backward()
    for name, p in acte.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loss_is_mass_weighted_bce():
    acte = _acte()
    out = acte(torch.randn(2, 6, 12, 16), grl_coeff=None)
    labels = torch.tensor([True, False])
    expected = domain_bce(out["disc_logits"], labels, weight=out["regions"].mass)
    torch.testing.assert_close(acte.loss(out, labels), expected)


def test_grl_reverses_and_scales_the_feature_gradient():
    # With dropout 0 the forward is deterministic; the detached map and mass weight leave the GRL as
    # the only path from the loss to the features, so the whole input gradient flips and scales.
    acte = _acte(dropout=0.0)
    x = torch.randn(1, 6, 12, 12)
    grads = {}
    for coeff in (None, 0.25):
        xi = x.clone().requires_grad_(True)
        acte.loss(acte(xi, grl_coeff=coeff), True).backward()
        grads[coeff] = xi.grad
    assert grads[None].abs().sum() > 0
    torch.testing.assert_close(grads[0.25], -0.25 * grads[None])


def test_degenerate_inputs_stay_finite():
    out = _acte(iters=3)(torch.zeros(1, 6, 9, 9), grl_coeff=None)  # every cosine is 0
    assert torch.isfinite(out["regions"].features).all() and torch.isfinite(out["tmap"]).all()


def test_bad_arguments_raise():
    with pytest.raises(ConfigError):
        ACTE(in_dim=4, cell=0, iters=1, kappa=10.0, disc_hidden=8, disc_dropout=0.0)


def test_bf16_autocast_with_a_saturated_discriminator_stays_finite():
    acte = _acte()
    last = [m for m in acte.discriminator.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.constant_(last.bias, 30.0)  # sigmoid rounds to 1 in bf16
    x = torch.randn(1, 6, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = acte(x, grl_coeff=1.0)
        loss = acte.loss(out, False)
    loss.backward()
    assert torch.isfinite(out["tmap"]).all() and torch.isfinite(out["transferability"]).all()
    assert torch.isfinite(x.grad).all()
