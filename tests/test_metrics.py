import numpy as np
import pytest
import torch

from tmtseg.metrics import SegMetrics, format_table


def numpy_miou(preds, labels, k, ignore):
    """Reference: per-class IoU from pixel sets, nan-mean over classes present in prediction or label."""
    ious = []
    for c in range(k):
        inter = union = 0
        for p, g in zip(preds, labels):
            valid = g != ignore
            inter += np.sum((p == c) & (g == c) & valid)
            union += np.sum(((p == c) | (g == c)) & valid)
        ious.append(inter / union if union else np.nan)
    return np.nanmean(ious) * 100, ious


def test_miou_matches_numpy_reference():
    rng = np.random.default_rng(0)
    k, ignore = 5, 255
    preds = [rng.integers(0, k, size=(17, 23)) for _ in range(4)]
    labels = [rng.integers(0, k, size=(17, 23)) for _ in range(4)]
    labels[0][:3] = ignore
    labels[2][labels[2] == 4] = 3  # class 4 absent from one label: still counted where predicted
    m = SegMetrics(num_classes=k, ignore_index=ignore)
    for p, g in zip(preds, labels):
        m.update(torch.from_numpy(p), torch.from_numpy(g))
    out = m.compute()
    ref, ref_ious = numpy_miou(preds, labels, k, ignore)
    assert out["mIoU"] == pytest.approx(ref)
    for got, want in zip(out["per_class_iou"].values(), ref_ious):
        assert got == pytest.approx(want * 100)


def test_absent_class_is_left_out_of_the_mean():
    m = SegMetrics(num_classes=3, ignore_index=255)
    g = torch.tensor([[0, 0, 1, 1]])
    m.update(g.clone(), g)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100.0)
    assert out["per_class_iou"]["class2"] is None
    assert "n/a" in format_table(out)


def test_binary_dice_and_iou():
    m = SegMetrics(num_classes=2, ignore_index=255, binary=True)
    gt = torch.tensor([[1, 1, 0, 0, 255]])
    pred = torch.tensor([[1, 0, 1, 0, 1]])  # tp 1, fp 1, fn 1; the ignored pixel does not count
    m.update(pred, gt)
    out = m.compute()
    assert out["dice"] == pytest.approx(50.0)
    assert out["iou"] == pytest.approx(100 / 3)
    assert out["mean_image_dice"] == pytest.approx(50.0)


def test_shape_mismatch_is_an_error():
    m = SegMetrics(num_classes=2, ignore_index=255)
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
