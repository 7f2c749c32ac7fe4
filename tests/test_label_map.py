"""data.label_map: a dataset's classes put into a task's classes (validation, the lookup table, every split kind)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tmtseg.config import Config, DataConfig, SplitConfig, load_config_over
from tmtseg.data import build_dataset, check_split
from tmtseg.data.label_map import MappedDecoder, build_lut, class_shares
from tmtseg.data.listing import default_palette
from tmtseg.data.sources import list_source
from tmtseg.errors import ConfigError

SOURCE = ["sky", "road", "building", "tree", "car"]  # the synthetic scenes' classes
TASK = ["flat", "nature", "thing"]
SYNTHETIC_MAP = {"sky": "nature", "road": "flat", "building": "ignore", "tree": "nature", "car": "thing"}


def test_lut_maps_every_source_id_and_keeps_ignore():
    lut = build_lut(SYNTHETIC_MAP, source_classes=SOURCE, task_classes=TASK, ignore_index=255, key="k")
    assert lut.shape == (256,)
    np.testing.assert_array_equal(lut[:5], [1, 0, 255, 1, 2])
    assert lut[255] == 255
    label = np.array([[0, 1, 2], [3, 4, 255]])  # [2, 3]: every source id and the void value
    decoder = MappedDecoder(lambda record: (np.zeros((2, 3, 3), np.uint8), label), lut)
    expected = np.array([[TASK.index("nature"), 0, 255], [1, 2, 255]])
    np.testing.assert_array_equal(decoder(None)[1], expected)
    # a per-pixel reference on a random label
    rng = np.random.default_rng(0)
    big = rng.choice([0, 1, 2, 3, 4, 255], size=(17, 23))
    ref = np.vectorize(lambda v: 255 if v == 255 or SYNTHETIC_MAP[SOURCE[v]] == "ignore"
                       else TASK.index(SYNTHETIC_MAP[SOURCE[v]]))(big)  # fmt: skip
    np.testing.assert_array_equal(lut[big], ref)


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({k: v for k, v in SYNTHETIC_MAP.items() if k != "tree"}, r"data\.label_map\.synthetic: class\(es\) 'tree'"),
        ({**SYNTHETIC_MAP, "lake": "nature"}, r"'lake' is not a class of the dataset"),
        ({**SYNTHETIC_MAP, "car": "vehicle"}, r"data\.label_map\.synthetic\.car='vehicle': not a task class"),
    ],
)
def test_unmapped_unknown_or_wrong_target_is_an_error_naming_it(mapping, match):
    data = DataConfig(num_classes=3, class_names=TASK, label_map={"synthetic": mapping})
    with pytest.raises(ConfigError, match=match):
        list_source(SplitConfig(num_images=1), data)


def test_a_label_map_needs_the_task_classes():
    data = DataConfig(num_classes=3, label_map={"synthetic": SYNTHETIC_MAP})
    with pytest.raises(ConfigError, match="needs data.class_names"):
        list_source(SplitConfig(num_images=1), data)


def test_synthetic_split_through_the_config():
    cfg = load_config_over(Config(), ["data.num_classes=3", f"data.class_names={TASK}"]
                           + [f"data.label_map.synthetic.{k}={v}" for k, v in SYNTHETIC_MAP.items()])  # fmt: skip
    plain = build_dataset(SplitConfig(num_images=2), DataConfig(), train=False)
    mapped = build_dataset(SplitConfig(num_images=2), cfg.data, train=False, key="data.train")
    assert mapped.class_names == TASK and mapped.num_classes == 3
    np.testing.assert_array_equal(mapped.palette, default_palette(3))
    lut = build_lut(SYNTHETIC_MAP, source_classes=SOURCE, task_classes=TASK, ignore_index=255, key="k")
    for i in range(2):
        raw = plain[i]["label"].numpy()
        np.testing.assert_array_equal(mapped[i]["label"].numpy(), lut[raw])
        assert (raw == SOURCE.index("building")).any()  # the ignored class was really exercised
    shares = class_shares(mapped.records, mapped.decoder, num_classes=3)
    assert shares.shape == (4,) and shares.sum() == pytest.approx(1.0) and shares[-1] > 0  # building -> void


def test_folder_dataset_is_mapped_by_its_directory_name(tmp_path: Path):
    root = tmp_path / "clinic_a"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["bg", "tumour", "cyst"], "ignore_index": 9}))
    mask = np.array([[0, 1, 2, 9]], dtype=np.uint8).repeat(3, 0)  # [3, 4]
    Image.fromarray(mask).save(root / "masks" / "a.png")
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(root / "images" / "a.png")
    split = SplitConfig(kind="folder", path=str(root))
    data = DataConfig(num_classes=2, class_names=["background", "lesion"],
                      label_map={"clinic_a": {"bg": "background", "tumour": "lesion", "cyst": "ignore"}})  # fmt: skip
    ds = build_dataset(split, data, train=False)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), np.array([[0, 1, 255, 255]]).repeat(3, 0))
    assert check_split(split, data) == []
    data.label_map["clinic_a"].pop("cyst")
    with pytest.raises(ConfigError, match=r"data\.label_map\.clinic_a: class\(es\) 'cyst'"):
        build_dataset(split, data, train=False)


def test_split_scale_overrides_data_scale():
    data = DataConfig(scale=0.5)
    assert build_dataset(SplitConfig(num_images=1, scale=0.25), data, train=False).scale == 0.25
    assert build_dataset(SplitConfig(num_images=1), data, train=False).scale == 0.5
    with pytest.raises(ConfigError, match=r"data\.val\.scale=-1"):
        load_config_over(Config(), ["data.val.scale=-1"])
