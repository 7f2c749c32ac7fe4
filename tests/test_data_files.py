"""Folder and Cityscapes datasets, and data checks on deliberately broken files (all generated in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tmtseg.config import Config, DataConfig, SplitConfig
from tmtseg.data import build_dataset, check_config, check_split
from tmtseg.errors import ConfigError, DataError

CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def rgb(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def make_folder(root: Path, meta: dict, masks: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    for i, (stem, mask) in enumerate(masks.items()):
        Image.fromarray(rgb(*mask.shape[:2], seed=i)).save(root / "images" / f"{stem}{suffix}")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def folder_split(root: Path, **kw) -> SplitConfig:
    return SplitConfig(kind="folder", path=str(root), **kw)


def test_folder_id_map_and_ignore(tmp_path):
    raw = np.array([[10, 20, 99], [20, 10, 10]], dtype=np.uint8).repeat(4, 0).repeat(5, 1)  # [8, 15]
    root = make_folder(
        tmp_path / "ds", {"classes": ["a", "b"], "ignore_index": 99, "id_map": {10: 0, 20: 1}}, {"x": raw}
    )
    ds = build_dataset(folder_split(root), DataConfig(num_classes=2), train=False)
    expected = np.select([raw == 10, raw == 20], [0, 1], 255)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
    np.testing.assert_array_equal(ds[0]["image"].permute(1, 2, 0).numpy(), rgb(8, 15, seed=0))
    assert ds.class_names == ["a", "b"] and ds.palette.shape == (2, 3) and ds[0]["name"] == "x"


def test_folder_plain_ids_palette_mode_sorting_and_range(tmp_path):
    masks = {}
    for stem, value in [("c", 2), ("a", 0), ("b", 1)]:
        m = np.full((6, 7), value, dtype=np.uint8)
        m[0, 0] = 255  # the default ignore value
        masks[stem] = m
    root = make_folder(
        tmp_path / "ds", {"classes": ["x", "y", "z"], "palette": [[0, 0, 0], [9, 9, 9], [5, 5, 5]]}, masks
    )
    Image.fromarray(masks["b"]).convert("P").save(root / "masks" / "b.png")  # an indexed PNG with a palette
    assert Image.open(root / "masks" / "b.png").mode == "P"
    data = DataConfig(num_classes=3)
    ds = build_dataset(folder_split(root), data, train=False)
    assert [r.name for r in ds.records] == ["a", "b", "c"]
    assert [int(ds[i]["label"][1, 1]) for i in range(3)] == [0, 1, 2]
    assert all(int(ds[i]["label"][0, 0]) == 255 for i in range(3))
    assert ds.palette.tolist() == [[0, 0, 0], [9, 9, 9], [5, 5, 5]]
    assert [r.name for r in build_dataset(folder_split(root, start=1, stop=2), data, train=False).records] == ["b"]


def test_folder_yaml_errors(tmp_path):
    root = make_folder(tmp_path / "ds", {"classes": ["a", "b"], "colours": [1, 2]}, {"x": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ConfigError, match=r"dataset\.yaml: unknown key 'colours'"):
        build_dataset(folder_split(root), DataConfig(num_classes=2), train=False)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["a", "b"], "id_map": {1: 5}}))
    with pytest.raises(ConfigError, match="id_map"):
        build_dataset(folder_split(root), DataConfig(num_classes=2), train=False)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c"]}))
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_dataset(folder_split(root), DataConfig(num_classes=2), train=False)
    (root / "dataset.yaml").unlink()
    with pytest.raises(DataError, match="dataset.yaml"):
        build_dataset(folder_split(root), DataConfig(num_classes=2), train=False)


def test_cityscapes_label_ids_to_train_ids(tiny_cityscapes):
    split = SplitConfig(kind="cityscapes", path=str(tiny_cityscapes), domain="train")
    ds = build_dataset(split, DataConfig(num_classes=19), train=False)
    assert len(ds) == 3 and ds.num_classes == 19 and ds.class_names[13] == "car"
    assert [r.name for r in ds.records] == ["aachen_000000_000019", "aachen_000000_000020", "bremen_000000_000005"]
    raw = np.asarray(Image.open(ds.records[0].label))
    expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), 255))(raw)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
    assert set(np.unique(expected)) >= {0, 1, 2, 8, 10, 11, 13, 18, 255}
    city = SplitConfig(kind="cityscapes", path=str(tiny_cityscapes), domain="train", groups=["bremen"])
    bremen = build_dataset(city, DataConfig(num_classes=19), train=False)
    assert [r.group for r in bremen.records] == ["bremen"]
    val_split = SplitConfig(kind="cityscapes", path=str(tiny_cityscapes), domain="val")
    val = build_dataset(val_split, DataConfig(num_classes=19), train=False)
    assert len(val) == 1
    assert check_split(split, DataConfig(num_classes=19)) == []


def broken_folder(root: Path) -> tuple[Path, dict[str, Path]]:
    """Two good pairs and one bad pair per problem; returns the folder and the file each line must name."""
    good = np.zeros((8, 10), dtype=np.uint8)
    good[4:, :] = 1
    masks = {"good1": good, "good2": good, "trunc": good, "nomask": good, "size": good, "range": good, "colour": good}
    make_folder(root, {"classes": ["bg", "fg"]}, masks)
    data = (root / "images" / "trunc.png").read_bytes()
    (root / "images" / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "masks" / "nomask.png").unlink()
    Image.fromarray(np.zeros((9, 10), dtype=np.uint8)).save(root / "masks" / "size.png")
    bad_ids = good.copy()
    bad_ids[0, 0] = 7
    Image.fromarray(bad_ids).save(root / "masks" / "range.png")
    colour = np.zeros((8, 10, 3), dtype=np.uint8)
    colour[4:] = [255, 0, 0]
    Image.fromarray(colour).save(root / "masks" / "colour.png")
    names = {
        "trunc": root / "images" / "trunc.png",
        "nomask": root / "images" / "nomask.png",
        "size": root / "masks" / "size.png",
        "range": root / "masks" / "range.png",
        "colour": root / "masks" / "colour.png",
    }
    return root, names


def test_check_split_reports_one_line_per_bad_file(tmp_path):
    root, bad = broken_folder(tmp_path / "broken")
    lines = check_split(folder_split(root), DataConfig(num_classes=2))
    assert len(lines) == len(bad)
    for stem, path in bad.items():
        hits = [line for line in lines if line.startswith(f"{path}: ")]
        assert len(hits) == 1, (stem, lines)
        assert "\n" not in hits[0]
    problems = {stem: next(line for line in lines if line.startswith(str(path))) for stem, path in bad.items()}
    assert "truncated" in problems["trunc"]
    assert "missing mask" in problems["nomask"]
    assert "size" in problems["size"]
    assert "out of range" in problems["range"] and "7" in problems["range"]
    assert "colour" in problems["colour"]

    ds = build_dataset(folder_split(root), DataConfig(num_classes=2), train=True)
    with pytest.raises(DataError, match="trunc.png: unreadable or truncated image"):
        ds[[r.name for r in ds.records].index("trunc")]
    assert ds[[r.name for r in ds.records].index("good1")]["label"].shape == (128, 128)


def test_check_split_empty_split(tmp_path):
    root = make_folder(tmp_path / "ds", {"classes": ["a", "b"]}, {"x": np.zeros((4, 4), np.uint8)})
    lines = check_split(folder_split(root, start=1), DataConfig(num_classes=2), key="data.val")
    assert len(lines) == 1 and "empty split" in lines[0] and "data.val" in lines[0]
    with pytest.raises(ConfigError, match="selects no images"):
        build_dataset(folder_split(root, start=1), DataConfig(num_classes=2), train=False)


def test_check_config_on_a_broken_manifest_set(tmp_path):
    """A fake CamVid folder: a label value above the void value 11 is out of range, 11 itself is fine."""
    folder = tmp_path / "root" / "camvid-daydusk"
    (folder / "day").mkdir(parents=True)
    rows = ["image,label,domain,sequence,segnet_split,suggested_role"]
    for stem, top in [("s_001", 11), ("s_002", 12), ("s_003", 3)]:
        label = np.full((6, 8), 3, dtype=np.uint8)
        label[0, 0] = top
        Image.fromarray(rgb(6, 8)).save(folder / "day" / f"{stem}_img.png")
        Image.fromarray(label).save(folder / "day" / f"{stem}_lbl.png")
        rows.append(f"day/{stem}_img.png,day/{stem}_lbl.png,day,s,train,source_train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = Config()
    cfg.data.root = str(tmp_path / "root")
    cfg.data.num_classes = 11
    cfg.data.train = SplitConfig(kind="manifest", dataset="camvid-daydusk", domain="day", stop=2)
    cfg.data.val = SplitConfig(kind="manifest", dataset="camvid-daydusk", domain="day", start=1)
    lines = check_config(cfg)
    bad = folder / "day" / "s_002_lbl.png"
    assert lines == [f"{bad}: label ids out of range: 12 (neither a class id nor the ignore value)"]
    cfg.adapt.source_checkpoint = "some.safetensors"  # adapting: data.source (synthetic by default) is checked too
    cfg.data.source = SplitConfig(kind="synthetic", num_images=0)
    assert len(check_config(cfg)) == 2 and "empty split" in check_config(cfg)[1]
