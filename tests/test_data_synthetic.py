"""Synthetic day/dusk scenes, the training transforms and collation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data import build_dataset, collate
from tmtseg.data.synthetic import CLASS_NAMES, render_scene
from tmtseg.data.transforms import color_jitter, train_transform
from tmtseg.errors import ConfigError


def synth(domain: str = "day", *, seed: int = 0, num_images: int = 8, train: bool = False, **data_kw):
    split = SplitConfig(kind="synthetic", domain=domain, seed=seed, num_images=num_images)
    return build_dataset(split, DataConfig(**data_kw), train=train)


def scenes(domain: str, seeds) -> tuple[np.ndarray, np.ndarray]:
    pairs = [render_scene(np.random.default_rng(s), domain=domain) for s in seeds]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])  # [N, H, W, 3], [N, H, W]


def test_synthetic_is_deterministic_by_seed_and_index():
    a, b = synth(seed=3), synth(seed=3)
    item = a[5]
    assert item["image"].shape == (3, 128, 160) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (128, 160) and item["label"].dtype == torch.int64
    assert torch.equal(item["image"], b[5]["image"]) and torch.equal(item["label"], b[5]["label"])
    assert not torch.equal(item["image"], synth(seed=4)[5]["image"])
    assert not torch.equal(item["label"], a[6]["label"])
    sliced = build_dataset(SplitConfig(kind="synthetic", seed=3, num_images=8, start=5), DataConfig(), train=False)
    assert torch.equal(sliced[0]["image"], item["image"]) and sliced.records[0].name == a.records[5].name


def test_synthetic_classes():
    ds = synth("dusk", num_images=6)
    assert ds.class_names == CLASS_NAMES == ["sky", "road", "building", "tree", "car"] and ds.num_classes == 5
    labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3, 4}  # every class, no ignore pixels
    sky_rows = (labels == 0).float().mean(dim=(0, 2))
    assert sky_rows[:10].min() > 0.9 and sky_rows[-10:].max() == 0  # sky at the top, ground at the bottom
    with pytest.raises(ConfigError, match="domain"):
        synth("night")


def test_day_and_dusk_differ_as_designed():
    day_img, day_lbl = scenes("day", range(12))
    dusk_img, dusk_lbl = scenes("dusk", range(12))
    ratio = day_img.mean() / dusk_img.mean()
    assert 1.6 < ratio < 2.8  # dusk about half as bright
    day_rgb, dusk_rgb = day_img.reshape(-1, 3).mean(0), dusk_img.reshape(-1, 3).mean(0)
    assert dusk_rgb[2] / dusk_rgb[0] > 1.2 * day_rgb[2] / day_rgb[0]  # bluish
    assert day_img.std(axis=(1, 2, 3)).mean() > 1.3 * dusk_img.std(axis=(1, 2, 3)).mean()  # lower contrast
    assert (day_lbl == 4).mean() > 1.5 * (dusk_lbl == 4).mean()  # smaller cars
    # a per-pixel colour classifier fitted on day transfers badly to dusk: the shift is real
    means = np.stack([day_img[day_lbl == k].mean(0) for k in range(5)])

    def accuracy(img, lbl):
        pred = ((img[..., None, :].astype(float) - means) ** 2).sum(-1).argmin(-1)
        return (pred == lbl).mean()

    test_day, test_day_lbl = scenes("day", range(100, 106))
    test_dusk, test_dusk_lbl = scenes("dusk", range(100, 106))
    assert accuracy(test_day, test_day_lbl) > accuracy(test_dusk, test_dusk_lbl) + 0.2


def pattern(h: int = 60, w: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    """A left/right asymmetric stripe label and an image whose red channel encodes it."""
    cols = torch.arange(w)
    label = ((cols // 7) % 3 + (cols > w // 2).long() * 3).expand(h, w).clone()  # [H, W] ids 0..5
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = (label * 40).to(torch.uint8)
    image[1] = torch.arange(h)[:, None].expand(h, w).to(torch.uint8)
    return image, label


def test_train_transform_keeps_label_aligned_and_flips():
    image, label = pattern()
    flips = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        out_img, out_lbl = train_transform(image, label, scale=1.0, scale_range=(0.8, 1.3), crop_size=(40, 48),
                                           hflip=True, jitter=0.0, ignore_index=255, generator=gen)  # fmt: skip
        assert out_img.shape == (3, 40, 48) and out_lbl.shape == (40, 48)
        # away from stripe edges, the red channel still says which label the pixel has
        same = (out_lbl[:, 1:-1] == out_lbl[:, :-2]) & (out_lbl[:, 1:-1] == out_lbl[:, 2:])
        red = out_img[0, :, 1:-1].float()
        assert (red[same] - out_lbl[:, 1:-1][same].float() * 40).abs().max() <= 2
        # ids 3..5 sit right of ids 0..2 in the source: a flip puts them left
        left, right = out_lbl[:, :24].float().mean(), out_lbl[:, 24:].float().mean()
        flips += int(left > right + 0.5)
    assert 0 < flips < 12


def test_train_transform_pads_with_ignore_and_zero():
    image, label = pattern(20, 30)
    out_img, out_lbl = train_transform(image, label, scale=1.0, scale_range=(1.0, 1.0), crop_size=(32, 40),
                                       hflip=False, jitter=0.0, ignore_index=255)  # fmt: skip
    assert out_img.shape == (3, 32, 40)
    assert (out_lbl[20:] == 255).all() and (out_lbl[:, 30:] == 255).all() and (out_lbl[:20, :30] != 255).all()
    assert (out_img[:, 20:] == 0).all() and (out_img[:, :, 30:] == 0).all()
    assert torch.equal(out_lbl[:20, :30], label) and torch.equal(out_img[:, :20, :30], image)


def test_jitter_and_reproducible_items():
    image, _ = pattern()
    assert not torch.equal(color_jitter(image, 0.4, torch.Generator().manual_seed(0)), image)
    ds = synth(train=True, crop_size=[64, 96], color_jitter=0.3)
    torch.manual_seed(7)
    first = ds[2]
    torch.manual_seed(7)
    again = ds[2]
    torch.manual_seed(8)
    other = ds[2]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])


def test_collate():
    train = synth(train=True, crop_size=[64, 96])
    batch = collate([train[0], train[1], train[2]])
    assert batch["image"].shape == (3, 3, 64, 96) and batch["label"].shape == (3, 64, 96)
    assert batch["name"] == [r.name for r in train.records[:3]]
    ds = pickle.loads(pickle.dumps(synth(scale=0.5)))  # DataLoader workers receive the dataset pickled
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 80) and batch["label"].shape == (4, 128, 160)
