"""The three real manifest sets: decoding, filtering, counts and a full check sweep (reads /work/shared/data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data import build_dataset, check_split, resolve_data_root
from tmtseg.errors import ConfigError, DataError

CLASSES = {"camvid-daydusk": 11, "polyp-multicenter": 2, "retina-vessels": 2}


def manifest(dataset: str, domain: str, **kw) -> SplitConfig:
    return SplitConfig(kind="manifest", dataset=dataset, domain=domain, **kw)


def data_cfg(root, dataset: str, **kw) -> DataConfig:
    return DataConfig(root=str(root), num_classes=CLASSES[dataset], **kw)


def dataset(root, dataset_name: str, domain: str, *, train: bool = False, data_kw=None, **split_kw):
    split = manifest(dataset_name, domain, **split_kw)
    return build_dataset(split, data_cfg(root, dataset_name, **(data_kw or {})), train=train)


@pytest.mark.parametrize(
    "name, domain, roles, count",
    [
        ("camvid-daydusk", "day", ["source_train"], 82),
        ("camvid-daydusk", "dusk", ["target_adapt"], 62),
        ("polyp-multicenter", "kvasir", ["source_train"], 800),
        ("polyp-multicenter", "kvasir", ["source_val"], 100),
        ("polyp-multicenter", "cvc-colondb", [], 19),
        ("polyp-multicenter", "endoscene", [], 24),
        ("retina-vessels", "drive", ["source_train"], 20),
        ("retina-vessels", "drive", ["source_test"], 20),
        ("retina-vessels", "chase_db1", [], 8),
    ],
)
def test_counts_match_readme(shared_data, name, domain, roles, count):
    ds = dataset(shared_data, name, domain, roles=roles)
    assert len(ds) == count
    assert len({r.name for r in ds.records}) == count  # names are unique (kvasir train and val share file names)


def test_camvid_decoding(shared_data):
    ds = dataset(shared_data, "camvid-daydusk", "day", roles=["source_train"], stop=3)
    assert ds.num_classes == 11 and ds.class_names[0] == "Sky" and ds.palette.shape == (11, 3)
    for i, record in enumerate(ds.records):
        item = ds[i]
        raw = np.asarray(Image.open(record.label))
        expected = np.where(raw == 11, 255, raw)
        assert item["label"].dtype == torch.int64 and item["label"].shape == (360, 480)
        np.testing.assert_array_equal(item["label"].numpy(), expected)
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(record.image)))
    assert (np.asarray(Image.open(ds.records[0].label)) == 11).any()  # the void value was really exercised


@pytest.mark.parametrize("domain", ["kvasir", "cvc-colondb"])
def test_polyp_masks_threshold(shared_data, domain):
    ds = dataset(shared_data, "polyp-multicenter", domain, stop=2)
    for i, record in enumerate(ds.records):
        label = ds[i]["label"].numpy()
        grey = np.asarray(Image.open(record.label).convert("L"))
        np.testing.assert_array_equal(label, (grey > 127).astype(np.int64))
        assert 0.005 < label.mean() < 0.7  # a polyp, not an empty or inverted mask


def test_drive_fov_is_ignored(shared_data):
    ds = dataset(shared_data, "retina-vessels", "drive", roles=["source_test"], stop=2)
    for i, record in enumerate(ds.records):
        label = ds[i]["label"].numpy()
        fov = np.asarray(Image.open(record.fov).convert("L")) > 127
        assert label.shape == (584, 565)
        np.testing.assert_array_equal(label == 255, ~fov)
        assert set(np.unique(label[fov])) == {0, 1}
        assert 0.08 < label[fov].mean() < 0.2  # about 12.6% vessel pixels inside the FOV


def test_chase_downscaled_with_disc_fov(shared_data):
    ds = dataset(shared_data, "retina-vessels", "chase_db1", groups=["02"])
    assert [r.name for r in ds.records] == ["chase_db1_Image_02L", "chase_db1_Image_02R"]
    for i in range(len(ds)):
        item = ds[i]
        label = item["label"].numpy()
        assert item["image"].shape == (3, 960, 999) and label.shape == (960, 999)  # 2880x2997 / 3
        fov = label != 255
        assert 0.6 < fov.mean() < 0.75
        assert ndimage.label(fov)[1] == 1 and (ndimage.binary_fill_holes(fov) == fov).all()  # one filled disc
        rows = np.flatnonzero(fov.any(1))
        widths = fov.sum(1)[rows]
        assert widths.argmax() in range(len(rows) // 2 - 40, len(rows) // 2 + 40)  # widest at the middle: round
        assert 0.06 < label[fov].mean() < 0.13  # about 9.3% vessel pixels inside the FOV


def test_manifest_filters_sort_and_ranges(shared_data):
    full = dataset(shared_data, "camvid-daydusk", "day", roles=["source_train"])
    names = [r.image.name for r in full.records]
    assert names == sorted(names)
    part = dataset(shared_data, "camvid-daydusk", "day", roles=["source_train"], start=5, stop=12)
    assert [r.name for r in part.records] == [r.name for r in full.records[5:12]]
    seq = dataset(shared_data, "camvid-daydusk", "day", roles=["source_train"], groups=["0016E5"])
    assert len(seq) == 61 and {r.group for r in seq.records} == {"0016E5"}
    both = dataset(shared_data, "polyp-multicenter", "kvasir")
    assert len(both) == 900
    with pytest.raises(ConfigError, match="groups"):
        dataset(shared_data, "polyp-multicenter", "kvasir", groups=["1"])
    with pytest.raises(ConfigError, match="domain"):
        dataset(shared_data, "camvid-daydusk", "night")
    with pytest.raises(ConfigError, match="roles"):
        dataset(shared_data, "camvid-daydusk", "day", roles=["target_eval"])
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_dataset(manifest("camvid-daydusk", "day"), DataConfig(root=str(shared_data), num_classes=5), train=False)


def test_eval_and_train_items(shared_data):
    names = [f"c{k}" for k in range(11)]
    ev = dataset(shared_data, "camvid-daydusk", "dusk", stop=1, data_kw={"scale": 0.5, "class_names": names})
    assert ev.class_names == names and ev.ignore_index == 255
    item = ev[0]
    assert item["image"].shape == (3, 180, 240) and item["label"].shape == (360, 480)  # label keeps full resolution
    tr = dataset(
        shared_data, "camvid-daydusk", "dusk", stop=1, train=True, data_kw={"scale": 0.5, "crop_size": [96, 64]}
    )
    item = tr[0]
    assert item["image"].shape == (3, 96, 64) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (96, 64) and item["name"] == "dusk_0001TP_006690"


def test_resolve_data_root(shared_data, tmp_path):
    assert resolve_data_root("") == shared_data.resolve()
    assert resolve_data_root(str(shared_data)) == shared_data
    with pytest.raises(DataError, match="data root not found"):
        resolve_data_root(str(tmp_path / "nowhere"))


def test_check_split_has_no_false_positives_on_all_real_data(shared_data):
    """Decodes every file of every domain (about 1000 pairs)."""
    domains = {
        "camvid-daydusk": ["day", "dusk"],
        "polyp-multicenter": ["kvasir", "cvc-colondb", "endoscene"],
        "retina-vessels": ["drive", "chase_db1"],
    }
    checked = 0
    for name, doms in domains.items():
        for domain in doms:
            split = manifest(name, domain)
            assert check_split(split, data_cfg(shared_data, name)) == []
            checked += len(dataset(shared_data, name, domain))
    assert checked == 144 + 943 + 48
