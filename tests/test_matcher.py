"""Hungarian matcher (docs/method.md §3): batched == per image, empty targets, brute-force agreement, ignore pixels."""

from __future__ import annotations

import itertools

import torch

from tmtseg.losses.matcher import (
    HungarianMatcher,
    batch_dice,
    batch_sigmoid_ce,
    pred_coord_scale,
    sample_targets,
    uniform_coords,
)

K = 4


def matcher(num_points: int = 256) -> HungarianMatcher:
    return HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)


def random_problem(B: int, Q: int, ms: list[int], seed: int, H: int = 32, W: int = 24):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g),
        "pred_masks": torch.randn(B, Q, H // 4, W // 4, generator=g) * 3,
    }
    targets = []
    for m in ms:
        targets.append(
            {
                "labels": torch.randint(0, K, (m,), generator=g),
                "masks": torch.rand(m, H, W, generator=g) > 0.5,
                "valid": torch.rand(H, W, generator=g) > 0.1,
            }
        )
    return outputs, targets


def test_batched_equals_per_image():
    outputs, targets = random_problem(3, 6, [2, 0, 4], seed=0)
    torch.manual_seed(5)
    batched = matcher()(outputs, targets)
    for b, target in enumerate(targets):
        torch.manual_seed(5)  # one draw of points per call: the same points as in the batched call
        single = matcher()({k: v[b : b + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_empty_targets():
    outputs, targets = random_problem(2, 5, [0, 0], seed=1)
    for rows, cols in matcher()(outputs, targets):
        assert rows.dtype == cols.dtype == torch.int64 and rows.numel() == cols.numel() == 0


def test_one_to_one_and_agrees_with_brute_force():
    m = matcher(num_points=64)
    for seed in range(6):
        Q, M = 4, 1 + seed % 3
        outputs, targets = random_problem(1, Q, [M], seed=seed)
        torch.manual_seed(seed)
        rows, cols = m(outputs, targets)[0]
        assert len(rows) == M and len(set(rows.tolist())) == M and sorted(cols.tolist()) == list(range(M))
        torch.manual_seed(seed)
        coords = uniform_coords(64, 2)  # the matcher's own draw
        cost = m.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0], coords)  # [Q, M]
        best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), M))
        torch.testing.assert_close(cost[rows, cols].sum(), torch.as_tensor(best))


def test_obvious_assignment_is_found():
    H = W = 16
    gt = torch.zeros(2, H, W, dtype=torch.bool)
    gt[0, :8], gt[1, 8:] = True, True  # top half class 1, bottom half class 3
    masks = torch.full((1, 3, H // 4, W // 4), -10.0)
    masks[0, 2, 2:], masks[0, 0, :2] = 10.0, 10.0  # query 2 = bottom, query 0 = top
    logits = torch.zeros(1, 3, K + 1)
    logits[0, 0, 1] = logits[0, 2, 3] = 5.0
    rows, cols = matcher()(
        {"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.tensor([1, 3]), "masks": gt}]
    )[0]
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 0, 1: 2}


def test_ignored_pixels_have_zero_weight_and_do_not_sway_the_match():
    H = W = 16
    gt = torch.zeros(1, H, W, dtype=torch.bool)
    gt[0, :, :8] = True  # left half
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[:, 8:] = False  # the right half is ignore
    coords = torch.tensor([[[0.25, 0.5], [0.75, 0.5], [0.51, 0.5]]])  # left, right (ignored), next to the border
    labels, w = sample_targets(gt, valid, coords)
    assert w[0, 1] == 0 and w[0, 0] == 1 and 0 < w[0, 2] < 1
    assert labels[0, 0] == 1 and labels[0, 2] == 1  # interpolated over valid pixels only: still fully foreground
    # query 0: right on the valid half, wrong on the ignored one; query 1: half wrong on the valid half, right on the
    # ignored one. Counting the ignored pixels query 1 is the better match; without them query 0 is.
    masks = torch.full((1, 2, 4, 4), -10.0)
    masks[0, 0] = 10.0
    masks[0, 1, :2, :2] = 10.0
    logits = torch.zeros(1, 2, K + 1)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    rows, _ = matcher()(outputs, [{"labels": torch.tensor([0]), "masks": gt}])[0]
    assert rows.tolist() == [1]
    rows, _ = matcher()(outputs, [{"labels": torch.tensor([0]), "masks": gt, "valid": valid}])[0]
    assert rows.tolist() == [0]


def test_rows_sampled_by_index_equal_each_row_sampled_alone():
    """The criterion's path: rows pick their mask by index and carry their own points; each mask is read once for all
    its rows. The values must be those of every row sampled on its own, bit for bit."""
    g = torch.Generator().manual_seed(0)
    H, W = 20, 28
    label = torch.randint(0, 4, (H, W), generator=g)
    label[:3] = 255  # an ignored band
    masks = label[None] == torch.arange(4)[:, None, None]  # [4, H, W]
    valid = label != 255
    index = torch.tensor([2, 0, 2, 3, 2, 0])  # repeated masks (one row per decoder layer), one mask never picked
    coords = torch.rand(len(index), 50, 2, generator=g) * 1.2 - 0.1  # some points outside the map
    gt, w = sample_targets(masks, valid, coords, index=index)
    assert gt.shape == w.shape == (6, 50) and (w == 0).any() and ((w > 0) & (w < 1)).any()
    for n, m in enumerate(index.tolist()):
        gt_n, w_n = sample_targets(masks[m : m + 1], valid, coords[n : n + 1])  # one mask at one row's points
        assert torch.equal(gt[n], gt_n[0]) and torch.equal(w[n], w_n[0])
    # without an index, row m is mask m
    gt4, w4 = sample_targets(masks, valid, coords[:4])
    gt_i, w_i = sample_targets(masks, valid, coords[:4], index=torch.arange(4))
    assert torch.equal(gt4, gt_i) and torch.equal(w4, w_i)


def test_mask_costs_equal_their_definitions_pair_by_pair():
    """The costs are matmuls over points; each entry must be the weighted BCE mean and the weighted Dice of its pair."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 300, generator=g) * 3  # [L, Q, P]
    gt = (torch.rand(2, 4, 300, generator=g) > 0.5).float()  # [L, M, P]
    gt[..., :20] = 0.5  # interpolated labels at mask borders
    w = torch.rand(2, 1, 300, generator=g)
    w[..., 50:90] = 0.0  # ignored points
    ce, dice = batch_sigmoid_ce(pred, gt, w), batch_dice(pred, gt, w)
    assert ce.shape == dice.shape == (2, 5, 4)
    for layer, q, m in itertools.product(range(2), range(5), range(4)):
        x, y, wt = pred[layer, q], gt[layer, m], w[layer, 0]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
        torch.testing.assert_close(ce[layer, q, m], (bce * wt).sum() / wt.sum(), rtol=1e-5, atol=1e-6)
        s = x.sigmoid() * wt
        want = 1 - (2 * (s * y).sum() + 1) / (s.sum() + (y * wt).sum() + 1)
        torch.testing.assert_close(dice[layer, q, m], want, rtol=1e-5, atol=1e-6)


def test_pred_coord_scale_aligns_stride_four_predictions():
    torch.testing.assert_close(pred_coord_scale((16, 24), (64, 96)), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(pred_coord_scale((17, 14), (65, 53)), torch.tensor([53 / 56, 65 / 68]))
    torch.testing.assert_close(pred_coord_scale((8, 8), (128, 128)), torch.tensor([1.0, 1.0]))  # another resolution


def test_non_finite_predictions_still_match():
    outputs, targets = random_problem(1, 4, [2], seed=3)
    outputs["pred_masks"][0, 1] = float("nan")
    rows, cols = matcher()(outputs, targets)[0]
    assert len(rows) == len(cols) == 2


def test_uniform_coords_are_uniform_in_range_and_follow_the_global_seed():
    torch.manual_seed(0)
    x = uniform_coords(50_000, 2, low=-1.0, high=1.0)
    assert x.shape == (50_000, 2) and x.dtype == torch.float32
    assert -1 < x.min() and x.max() < 1
    # every one of the four 16-bit lanes of a 64-bit draw is uniform (a lane stuck at a sign would show here)
    lanes = x.flatten()[: 100_000 // 4 * 4].view(-1, 4)
    assert ((lanes < 0).float().mean(0) - 0.5).abs().max() < 0.01
    assert (lanes.mean(0).abs() < 0.01).all() and ((lanes.std(0) - 1 / 3**0.5).abs() < 0.01).all()
    hist = torch.histc(x, bins=64, min=-1, max=1) / x.numel()
    assert (hist - 1 / 64).abs().max() < 0.003
    torch.manual_seed(0)
    assert torch.equal(uniform_coords(50_000, 2, low=-1.0, high=1.0), x)
    assert uniform_coords(3, 5, 2).shape == (3, 5, 2) and uniform_coords(7).numel() == 7  # any count, not only 4k
