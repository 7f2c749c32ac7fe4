"""Set criterion (docs/method.md §3): perfect vs wrong predictions, ignore pixels, deep supervision, the normaliser."""

from __future__ import annotations

import pytest
import torch

from tmtseg.errors import DataError
from tmtseg.losses.criterion import SetCriterion, semantic_targets, uncertain_point_coords
from tmtseg.losses.matcher import HungarianMatcher

K, Q, H, W = 3, 5, 32, 32


def criterion(deep_supervision: bool = True) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    return SetCriterion(
        num_classes=K,
        matcher=matcher,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        num_points=256,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        deep_supervision=deep_supervision,
    )


def label_map() -> torch.Tensor:
    """Three 16-pixel-aligned blocks: class 0 top, class 2 bottom-left, class 1 bottom-right."""
    label = torch.zeros(H, W, dtype=torch.int64)
    label[16:, :16], label[16:, 16:] = 2, 1
    return label


def prediction_for(label: torch.Tensor) -> dict:
    """Queries 0..M-1 predict the present classes exactly (confident logits); the rest predict no-object."""
    t = semantic_targets(label, num_classes=K, ignore_index=255)
    logits = torch.full((1, Q, K + 1), -10.0)
    logits[0, :, K] = 10.0
    masks = torch.full((1, Q, H // 4, W // 4), -20.0)
    for q, (c, m) in enumerate(zip(t["labels"], t["masks"], strict=True)):
        logits[0, q, K], logits[0, q, c] = -10.0, 10.0
        masks[0, q][m[::4, ::4]] = 20.0
    return {"pred_logits": logits, "pred_masks": masks}


def test_semantic_targets():
    label = label_map()
    label[0, 0] = 255
    t = semantic_targets(label, num_classes=K, ignore_index=255)
    assert t["labels"].tolist() == [0, 1, 2] and t["masks"].dtype == torch.bool and t["masks"].shape == (3, H, W)
    assert (t["masks"].sum(0) == t["valid"]).all() and not t["valid"][0, 0] and t["valid"].sum() == H * W - 1
    with pytest.raises(DataError, match=r"\[7\]"):
        semantic_targets(torch.full((4, 4), 7), num_classes=K, ignore_index=255)
    empty = semantic_targets(torch.full((4, 4), 255), num_classes=K, ignore_index=255)
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 4, 4)


def test_perfect_prediction_is_near_zero_and_a_wrong_one_is_not():
    torch.manual_seed(0)
    label = label_map()
    targets = [semantic_targets(label, num_classes=K, ignore_index=255)]
    perfect = criterion(False)(prediction_for(label), targets)
    wrong = criterion(False)(prediction_for(label.flip(0)), targets)  # masks in the wrong places
    assert set(perfect) == {"loss_ce", "loss_mask", "loss_dice", "loss"}
    # what is left of a perfect prediction is the blur of its stride-4 masks at boundaries, where points concentrate
    assert perfect["loss_ce"] < 1e-3 and perfect["loss_dice"] < 0.5 and perfect["loss_mask"] < 1.0
    assert wrong["loss_mask"] > 10 * perfect["loss_mask"] and wrong["loss_dice"] > 10 * perfect["loss_dice"]
    torch.testing.assert_close(perfect["loss"], perfect["loss_ce"] + perfect["loss_mask"] + perfect["loss_dice"])


def test_ignored_pixels_carry_no_mask_loss():
    torch.manual_seed(0)
    label = label_map()
    wrong_top = prediction_for(label)
    wrong_top["pred_masks"][0, :, :2, :] *= -1  # every mask wrong in the top quarter of the image
    ignored = label.clone()
    ignored[:8] = 255  # ... which the label ignores
    t_ignored = semantic_targets(ignored, num_classes=K, ignore_index=255)
    t_full = semantic_targets(label, num_classes=K, ignore_index=255)
    a = criterion(False)(wrong_top, [t_ignored])
    b = criterion(False)(wrong_top, [t_full])
    perfect = criterion(False)(prediction_for(label), [t_ignored])
    assert a["loss_mask"] < 0.15 * b["loss_mask"] and a["loss_dice"] < 0.4 * b["loss_dice"]
    # only the blur across the ignore border separates it from a prediction right everywhere
    assert a["loss_mask"] < 2 * perfect["loss_mask"] and a["loss_dice"] < 2 * perfect["loss_dice"]


def test_deep_supervision_keys_and_sum():
    label = label_map()
    targets = [semantic_targets(label, num_classes=K, ignore_index=255)]
    out = prediction_for(label)
    out["aux_outputs"] = [prediction_for(label.flip(1)), prediction_for(label)]
    losses = criterion(True)(out, targets)
    suffixed = {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    assert set(losses) == suffixed | {"loss"}
    torch.testing.assert_close(losses["loss"], sum(losses[k] for k in suffixed))
    assert set(criterion(False)(out, targets)) == {"loss_ce", "loss_mask", "loss_dice", "loss"}


def test_num_masks_normaliser_and_override():
    label = label_map()
    targets = [
        semantic_targets(label, num_classes=K, ignore_index=255),
        semantic_targets(label, num_classes=K, ignore_index=255),
    ]
    crit = criterion(False)
    assert crit.num_masks(targets) == 6.0
    out = prediction_for(label.flip(0))
    out = {k: v.expand(2, *v.shape[1:]).clone() for k, v in out.items()}
    torch.manual_seed(0)
    default = crit(out, targets)
    torch.manual_seed(0)
    doubled = crit(out, targets, num_masks=12.0)
    torch.testing.assert_close(doubled["loss_mask"], default["loss_mask"] / 2)
    torch.testing.assert_close(doubled["loss_dice"], default["loss_dice"] / 2)
    torch.testing.assert_close(doubled["loss_ce"], default["loss_ce"])  # CE is a mean over queries


def test_images_without_targets_give_finite_losses_and_gradients():
    out = prediction_for(label_map())
    out = {k: v.clone().requires_grad_(True) for k, v in out.items()}
    empty = semantic_targets(torch.full((H, W), 255), num_classes=K, ignore_index=255)
    losses = criterion(False)(out, [empty])
    assert torch.isfinite(losses["loss"]) and losses["loss_mask"] == 0
    losses["loss"].backward()
    assert out["pred_logits"].grad is not None and out["pred_masks"].grad is not None


def test_uncertain_points_prefer_logits_near_zero():
    logits = torch.full((1, 1, 8, 8), 10.0)
    logits[..., :, :2] = 0.0  # the uncertain band: the left quarter
    torch.manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=100, oversample_ratio=3.0, importance_ratio=0.75)
    assert coords.shape == (1, 100, 2)
    assert (coords[0, :75, 0] < 0.25 + 1 / 16).float().mean() > 0.9  # interpolation blurs the band by half a cell


def test_point_weight_scales_each_point_and_zero_acts_like_ignore():
    label = label_map()
    wrong_top = prediction_for(label)
    targets = [semantic_targets(label, num_classes=K, ignore_index=255)]
    # the top class's mask wrong in its top quarter (flipping every mask there would make a class query's cost close
    # to a no-object query's, and which one is matched a coin toss of the random points)
    wrong_top["pred_masks"][0, 0, :2, :] *= -1

    def loss(point_weight=None, tgt=targets):
        torch.manual_seed(0)  # the same sampled points for every call
        out = {**wrong_top, **({"point_weight": point_weight} if point_weight is not None else {})}
        return criterion(False)(out, tgt)

    plain = loss()
    ones = loss(torch.ones(1, 1, H // 4, W // 4))
    torch.testing.assert_close(ones["loss_mask"], plain["loss_mask"])
    torch.testing.assert_close(ones["loss_dice"], plain["loss_dice"])
    # weight 0 on the wrong quarter (at the 4x coarser prediction grid, so its border is a blur): most loss is gone
    weight = torch.ones(1, 1, H // 4, W // 4)
    weight[..., :2, :] = 0.0
    assert loss(weight)["loss_mask"] < 0.4 * plain["loss_mask"]  # 0.16-0.28 over 80 draws
    # more weight on the wrong quarter: more loss
    weight[..., :2, :] = 3.0
    assert loss(weight)["loss_mask"] > 1.4 * plain["loss_mask"]  # >= 1.63 over 40 draws


def test_layers_batched_in_one_pass_equal_the_layers_one_by_one(monkeypatch):
    """Deep supervision computes every layer's matching and losses together; each layer's losses must be what that
    layer alone gives (the matcher's points drawn in the same order; the loss points made independent of the row
    count, since one draw for all rows cannot equal one draw per layer)."""
    import tmtseg.losses.criterion as crit_mod

    def fixed_points(logits, *, num_points, **_):
        g = torch.Generator().manual_seed(0)
        return torch.rand(num_points, 2, generator=g).expand(logits.shape[0], -1, -1)

    monkeypatch.setattr(crit_mod, "uncertain_point_coords", fixed_points)
    torch.manual_seed(0)
    labels = [label_map(), label_map().flip(1)]
    labels[1][:4] = 255  # some void
    targets = [semantic_targets(lab, num_classes=K, ignore_index=255) for lab in labels]
    layers = [
        {"pred_logits": torch.randn(2, Q, K + 1), "pred_masks": torch.randn(2, Q, H // 4, W // 4) * 3} for _ in range(3)
    ]
    out = {**layers[-1], "aux_outputs": layers[:-1], "point_weight": torch.rand(2, 1, H // 4, W // 4)}
    torch.manual_seed(1)
    together = criterion(True)(out, targets, num_masks=5.0)
    torch.manual_seed(1)
    for i, layer in enumerate(layers):
        alone = criterion(False)({**layer, "point_weight": out["point_weight"]}, targets, num_masks=5.0)
        suffix = "" if i == len(layers) - 1 else f"_{i}"
        for k in ("loss_ce", "loss_mask", "loss_dice"):
            torch.testing.assert_close(together[k + suffix], alone[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [None, [2, 0, 3, 1]], ids=["own-draws", "shared-draws"])
def test_uncertain_points_are_the_float_top_k(monkeypatch, groups):
    """The selection runs top-k on the int32 bits of |logit|: the same points as float top-k of -|logit|, among the
    candidates of the row's own draw or of its group's shared draw (an empty group draws nothing)."""
    import tmtseg.losses.criterion as crit_mod
    from tmtseg.losses.matcher import grid_sample_points

    torch.manual_seed(0)
    logits = torch.randn(6, 1, 10, 14) * 4
    drawn = []
    real = crit_mod.uniform_coords

    def recording(*shape, **kw):
        drawn.append(real(*shape, **kw))
        return drawn[-1]

    monkeypatch.setattr(crit_mod, "uniform_coords", recording)
    coords = uncertain_point_coords(logits, num_points=200, oversample_ratio=3.0, importance_ratio=0.75, groups=groups)
    group = torch.arange(6) if groups is None else torch.tensor([0, 0, 1, 1, 1, 2])  # each row's draw
    assert drawn[0].shape == (int(group.max()) + 1, 600, 2)  # the candidates, in grid_sample's frame
    grid = drawn[0][group]  # [M, 600, 2]: each row's candidates
    value = grid_sample_points(logits, grid)[:, 0]  # [M, 600]
    chosen = grid.gather(1, (-value.abs()).topk(150, dim=1).indices[..., None].expand(-1, -1, 2))
    expected = (chosen + 1.0) * 0.5  # in [0, 1], as the function returns them
    for got, want in zip(coords[:, :150], expected, strict=True):  # unsorted: compare as sorted lists of points
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    assert drawn[1].shape == (6, 50, 2) and torch.equal(coords[:, 150:], drawn[1])  # then each row's fresh points


def test_uncertain_points_in_groups_of_one_are_the_own_draws_and_groups_must_cover_the_rows():
    logits = torch.randn(5, 1, 10, 14)
    kw = {"num_points": 64, "oversample_ratio": 3.0, "importance_ratio": 0.75}
    torch.manual_seed(3)
    own = uncertain_point_coords(logits, **kw)
    torch.manual_seed(3)
    assert torch.equal(uncertain_point_coords(logits, **kw, groups=[1] * 5), own)
    with pytest.raises(ValueError, match="do not cover the 5 rows"):
        uncertain_point_coords(logits, **kw, groups=[2, 2])
