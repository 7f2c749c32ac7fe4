"""Users' own masks as they really come (issue 32): 0/255 binary PNGs, JPEG masks, colour (RGB) masks, and the class
table with its checks (a class missing from the training masks, a large void share). Every file is generated in
tmp_path; the README's own-data `dataset.yaml` examples are run here too."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tmtseg.cli import main
from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data import build_dataset, check_split
from tmtseg.errors import ConfigError, DataError

from .tiny import TINY

REPO = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "train.iters=2", "train.warmup_iters=1", "train.log_every=1", "train.save_every=2"]

# the colour masks' classes (Cityscapes colours) and a void colour
COLOURS = {"road": [128, 64, 128], "car": [0, 0, 142], "sky": [70, 130, 180]}
VOID = [0, 0, 0]


def run(*args: str) -> subprocess.CompletedProcess:
    """`tmtseg --no-progress ARGS` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--no-progress", *args])
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def disc(h: int = 48, w: int = 64, *, cx: int = 30, cy: int = 22, r: int = 12) -> np.ndarray:
    """A round object: bool [H, W]."""
    yy, xx = np.ogrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def scene(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Class ids of a street-like colour mask: sky on top, road below, a car and a void strip. int [H, W] in
    {0: road, 1: car, 2: sky, 3: void}"""
    ids = np.zeros((h, w), dtype=np.int64)
    ids[: h // 3] = 2
    x = 8 + 4 * seed
    ids[h // 2 : h // 2 + 12, x : x + 20] = 1
    ids[-4:, :10] = 3
    return ids


def write_folder(root: Path, meta: dict, masks: dict[str, np.ndarray], *, suffix: str = ".png", quality: int = 75):
    """images/<stem>.png (random), masks/<stem><suffix> (JPEG at `quality`) and dataset.yaml."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    for i, (stem, mask) in enumerate(masks.items()):
        rgb = np.random.default_rng(i).integers(0, 255, (*mask.shape[:2], 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{stem}.png")
        if suffix == ".jpg":
            Image.fromarray(mask).save(root / "masks" / f"{stem}.jpg", quality=quality)
        else:
            Image.fromarray(mask).save(root / "masks" / f"{stem}{suffix}")
    return root


def folder(root: Path, **kw) -> SplitConfig:
    return SplitConfig(kind="folder", path=str(root), **kw)


def labels(root: Path, num_classes: int) -> list[np.ndarray]:
    ds = build_dataset(folder(root), DataConfig(num_classes=num_classes), train=False)
    return [ds[i]["label"].numpy() for i in range(len(ds))]


# ------------------------------------------------------------------------------------------- 1. 0/255 binary masks
def binary_masks() -> dict[str, np.ndarray]:
    return {f"m{i}": (disc(cx=20 + 8 * i) * 255).astype(np.uint8) for i in range(3)}


def test_a_0_255_png_without_id_map_is_an_error_that_names_the_fix(tmp_path):
    """Read with the default ignore value 255, every polyp pixel of a 0/255 mask was don't-care, and the data check
    found no problem: now each split says so, naming dataset.yaml and the fix."""
    root = write_folder(tmp_path / "kvasir", {"classes": ["background", "polyp"]}, binary_masks())
    lines = check_split(folder(root), DataConfig(num_classes=2))
    assert len(lines) == 1, lines  # one line for the folder, not one per mask
    assert lines[0].startswith(f"{root / 'dataset.yaml'}: masks holding only 0 and 255")
    assert "threshold: 128" in lines[0] and "id_map: {0: 0, 255: 1}" in lines[0] and "'polyp'" in lines[0]
    result = run("data", "check", str(root))
    assert result.returncode == 2 and result.stdout.splitlines() == lines
    with pytest.raises(DataError, match="masks holding only 0 and 255"):
        build_dataset(folder(root), DataConfig(num_classes=2), train=False)[0]


@pytest.mark.parametrize("fix", [{"threshold": 128}, {"id_map": {0: 0, 255: 1}}])
def test_each_fix_the_error_names_reads_255_as_the_foreground(tmp_path, fix):
    masks = binary_masks()
    root = write_folder(tmp_path / "kvasir", {"classes": ["background", "polyp"], **fix}, masks)
    assert check_split(folder(root), DataConfig(num_classes=2)) == []
    for label, mask in zip(labels(root, 2), masks.values()):
        np.testing.assert_array_equal(label, (mask == 255).astype(np.int64))  # no pixel left as don't-care


def test_ignore_index_that_id_map_also_maps_is_refused(tmp_path):
    meta = {"classes": ["background", "polyp"], "ignore_index": 255, "id_map": {0: 0, 255: 1}}
    root = write_folder(tmp_path / "k", meta, binary_masks())
    with pytest.raises(ConfigError, match=r"dataset\.yaml: value 255 is both the ignore_index and in id_map"):
        check_split(folder(root), DataConfig(num_classes=2))


# ---------------------------------------------------------------------------------------------------- 2. JPEG masks
def test_jpeg_binary_masks_are_refused_with_the_way_out_and_read_with_a_threshold(tmp_path):
    masks = binary_masks()
    root = write_folder(tmp_path / "kvasir", {"classes": ["background", "polyp"]}, masks, suffix=".jpg")
    jpeg = np.asarray(Image.open(root / "masks" / "m0.jpg"))
    assert len(np.unique(jpeg)) > 2  # compression spread 0/255 into other values
    lines = check_split(folder(root), DataConfig(num_classes=2))
    assert len(lines) == 3 and all("label ids out of range" in ln and "threshold: T" in ln for ln in lines)
    (root / "dataset.yaml").write_text("classes: [background, polyp]\nthreshold: 128\n")
    assert check_split(folder(root), DataConfig(num_classes=2)) == []
    for label, mask in zip(labels(root, 2), masks.values()):
        assert set(np.unique(label)) == {0, 1}
        assert (label == (mask == 255)).mean() > 0.995  # JPEG ringing settled; at most an edge pixel moves


def test_threshold_reads_colour_and_16_bit_binary_masks_by_their_brightness(tmp_path):
    """RGB JPEG masks (as CVC-ColonDB ships), a red-on-black one (whose grey would be 76) and a 16-bit PNG."""
    fg = disc()
    grey = np.repeat((fg * 255).astype(np.uint8)[..., None], 3, axis=2)
    red = np.zeros((*fg.shape, 3), dtype=np.uint8)
    red[fg] = [255, 0, 0]
    root = write_folder(tmp_path / "cvc", {"classes": ["background", "polyp"], "threshold": 100},
                        {"grey": grey, "red": red}, suffix=".jpg")  # fmt: skip
    Image.fromarray((fg * 60000).astype(np.uint16)).save(root / "masks" / "deep.png")
    Image.fromarray(np.zeros((*fg.shape, 3), dtype=np.uint8)).save(root / "images" / "deep.png")
    ds = build_dataset(folder(root), DataConfig(num_classes=2), train=False)
    assert [r.name for r in ds.records] == ["deep", "grey", "red"]
    for i in range(3):
        assert (ds[i]["label"].numpy() == fg).mean() > 0.995, ds.records[i].name


# --------------------------------------------------------------------------------------------------- 3. colour masks
def colour_meta(**extra) -> dict:
    return {"classes": list(COLOURS), "colors": {**COLOURS, "ignore": VOID}, **extra}


def paint(ids: np.ndarray) -> np.ndarray:
    table = np.array([*COLOURS.values(), VOID], dtype=np.uint8)
    return table[ids]  # [H, W, 3]


def test_colour_png_masks_decode_exactly_and_an_unknown_colour_names_file_and_colour(tmp_path):
    ids = {"a": scene(seed=0), "b": scene(seed=1)}
    root = write_folder(tmp_path / "streets", colour_meta(), {k: paint(v) for k, v in ids.items()})
    ds = build_dataset(folder(root), DataConfig(num_classes=3), train=False)
    for i, expected in enumerate(ids.values()):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), np.where(expected == 3, 255, expected))
    assert ds.palette.tolist() == list(COLOURS.values())  # shown in the masks' own colours
    bad = paint(ids["b"])
    bad[2:4, 40:43] = [250, 170, 30]  # six pixels of a class dataset.yaml does not list (traffic light)
    Image.fromarray(bad).save(root / "masks" / "b.png")
    lines = check_split(folder(root), DataConfig(num_classes=3))
    assert lines == [
        f"{root / 'masks' / 'b.png'}: unknown colour [250, 170, 30] on 6 pixels: none of the colors in dataset.yaml is"
        " within color_tolerance=48 (nearest: 'road' [128, 64, 128], 122 away); add it under colors"
    ]


@pytest.mark.parametrize("quality", [75, 95])
def test_colour_jpeg_masks_decode_through_the_noise_and_a_patch_of_an_unknown_colour_is_an_error(tmp_path, quality):
    ids = {"a": scene(seed=0), "b": scene(seed=1)}
    root = write_folder(tmp_path / "streets", colour_meta(), {k: paint(v) for k, v in ids.items()},
                        suffix=".jpg", quality=quality)  # fmt: skip
    noisy = np.asarray(Image.open(root / "masks" / "a.jpg")).astype(int)
    assert np.abs(noisy - paint(ids["a"])).max() > 10  # the colours really moved
    assert check_split(folder(root), DataConfig(num_classes=3)) == []
    ds = build_dataset(folder(root), DataConfig(num_classes=3), train=False)
    for i, expected in enumerate(ids.values()):
        label, want = ds[i]["label"].numpy(), np.where(expected == 3, 255, expected)
        assert (label == want).mean() > 0.97  # only seams between two colours may go to the other one
        inner = np.ones_like(expected, dtype=bool)
        for k in np.unique(expected):  # away from every edge the class is exact
            region = expected == k
            inner &= ~region | np.pad(region, 3)[6:, 3:-3] & np.pad(region, 3)[:-6, 3:-3]
            inner &= ~region | np.pad(region, 3)[3:-3, 6:] & np.pad(region, 3)[3:-3, :-6]
        np.testing.assert_array_equal(label[inner], want[inner])
    bad = paint(ids["b"])
    bad[20:32, 40:52] = [250, 170, 30]  # a 12 x 12 patch of an unlisted colour
    Image.fromarray(bad).save(root / "masks" / "b.jpg", quality=quality)
    lines = check_split(folder(root), DataConfig(num_classes=3))
    assert len(lines) == 1 and lines[0].startswith(f"{root / 'masks' / 'b.jpg'}: unknown colour [")
    shown = [int(v) for v in re.search(r"unknown colour \[(\d+), (\d+), (\d+)\]", lines[0]).groups()]
    assert np.abs(np.array(shown) - [250, 170, 30]).max() <= 16  # the colour named is the patch's
    assert "(JPEG: a patch of about it)" in lines[0] and "add it under colors" in lines[0]


def test_colour_masks_without_colors_name_the_key(tmp_path):
    root = write_folder(tmp_path / "streets", {"classes": list(COLOURS)}, {"a": paint(scene())})
    (line,) = check_split(folder(root), DataConfig(num_classes=3))
    assert "colour (RGB) label" in line and "colors: {class: [r, g, b]}" in line


def test_several_colours_for_one_class(tmp_path):
    ids = scene()
    mask = paint(ids)
    mask[ids == 1] = [0, 0, 70]  # a truck, read as 'car'
    meta = colour_meta()
    meta["colors"]["car"] = [[0, 0, 142], [0, 0, 70]]
    root = write_folder(tmp_path / "streets", meta, {"a": mask})
    np.testing.assert_array_equal(labels(root, 3)[0], np.where(ids == 3, 255, ids))


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"classes": ["a", "b", "c"], "threshold": 128}, "'threshold' is for 2 classes"),
        ({"classes": ["a", "b"], "threshold": 0}, "'threshold' must be a number > 0"),
        ({"classes": ["a", "b"], "threshold": 128, "id_map": {0: 0, 255: 1}}, "'id_map' does not apply with"),
        ({"classes": ["a", "b"], "threshold": 128, "colors": {"a": [0, 0, 0], "b": [1, 1, 1]}}, "exclude each other"),
        ({"classes": ["a", "b"], "colors": {"a": [0, 0, 0]}}, r"no colour for class\(es\) 'b'"),
        ({"classes": ["a", "b"], "colors": {"a": [0, 0, 0], "b": [0, 0, 0]}}, r"colors\.b: \[0, 0, 0\] is listed"),
        ({"classes": ["a", "b"], "colors": {"a": [0, 0, 0], "b": [1, 1, 1], "c": [2, 2, 2]}}, "colors.c: not a class"),
        ({"classes": ["a", "b"], "colors": {"a": [0, 0, 300], "b": [1, 1, 1]}}, r"colors\.a must be \[r, g, b\]"),
        ({"classes": ["a", "b"], "colors": {"a": [0, 0, 0], "b": [1, 1, 1]}, "ignore_index": 9}, "'ignore_index'"),
        ({"classes": ["a", "b"], "color_tolerance": 10}, "'color_tolerance' applies to colour masks only"),
    ],
)
def test_dataset_yaml_format_keys_are_checked_naming_the_file(tmp_path, meta, match):
    root = write_folder(tmp_path / "ds", meta, {"a": np.zeros((8, 8), np.uint8)})
    with pytest.raises(ConfigError, match=re.escape(str(root / "dataset.yaml")) + ".*" + match):
        check_split(folder(root), DataConfig(num_classes=len(meta["classes"])))


# ------------------------------------------------------------------------------ 4. what the model will learn from
def three_class_split(tmp_path: Path) -> tuple[Path, Path]:
    """train: classes a and b only; val: a, b and c. Indexed PNGs, 255 = void on the top row."""
    train, val = {}, {}
    for i in range(2):
        m = np.zeros((10, 10), dtype=np.uint8)
        m[5:, :] = 1
        m[0, :] = 255
        train[f"t{i}"] = m
        v = m.copy()
        v[5:, 5:] = 2
        val[f"v{i}"] = v
    meta = {"classes": ["a", "b", "c"]}
    return write_folder(tmp_path / "train", meta, train), write_folder(tmp_path / "val", meta, val)


def split_args(train: Path, val: Path) -> list[str]:
    return ["data.train.kind=folder", f"data.train.path={train}", "data.val.kind=folder", f"data.val.path={val}",
            "data.num_classes=3"]  # fmt: skip


def write_config(tmp_path: Path, train: Path, val: Path) -> Path:
    config = tmp_path / "task.yaml"
    split = lambda p: {"kind": "folder", "path": str(p)}  # noqa: E731
    config.write_text(yaml.safe_dump({"data": {"num_classes": 3, "train": split(train), "val": split(val)}}))
    return config


def test_data_check_prints_the_class_table_and_a_class_missing_from_training_is_an_error(tmp_path):
    train, val = three_class_split(tmp_path)
    config = write_config(tmp_path, train, val)
    result = run("data", "check", str(config))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"data.train: class 'c' is in none of the 2 masks of {train}, so the model cannot learn it; check the masks"
        " and their decoding (dataset.yaml), or set data.allow_missing_classes=true"
    ]
    table = result.stderr.splitlines()
    assert table[0] == "class shares per split: % of mask pixels, masks holding the class"
    assert table[1].split() == ["class", "data.train", "(2", "images)", "data.val", "(2", "images)"]
    # 100 pixels a mask: a 40, b 50, void 10; val: b 25 of them c
    assert [row.split() for row in table[2:6]] == [
        ["a", "40.0%", "2", "40.0%", "2"],
        ["b", "50.0%", "2", "25.0%", "2"],
        ["c", "0%", "0", "25.0%", "2"],
        ["ignore", "10.0%", "2", "10.0%", "2"],
    ]
    assert table[-1] == f"1 problem(s) in 1 split group(s) of {config}"
    allowed = run("data", "check", str(config), "data.allow_missing_classes=true")
    assert allowed.returncode == 0 and allowed.stdout == ""


def test_a_training_command_prints_the_table_and_stops_on_a_class_missing_from_training(tmp_path):
    train, val = three_class_split(tmp_path)
    out = tmp_path / "run"
    result = run("train", *QUICK, *split_args(train, val), f"output_dir={out}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"tmtseg: error: data.train: class 'c' is in none of the 2 masks of {train}, so the model cannot learn it;"
        " check the masks and their decoding (dataset.yaml), or set data.allow_missing_classes=true"
    ]
    assert result.stdout.splitlines()[0] == "class shares per split: % of mask pixels, masks holding the class"
    assert result.stdout.splitlines()[4].split() == ["c", "0%", "0", "25.0%", "2"]
    assert not (out / "checkpoints").exists()


def test_an_ignore_value_covering_much_of_a_split_is_a_warning_naming_it(tmp_path):
    masks = {}
    for i in range(2):
        m = np.zeros((10, 10), dtype=np.uint8)
        m[4:, :] = 1
        m[:3, :] = 7  # 30% of the pixels
        masks[f"m{i}"] = m
    root = write_folder(tmp_path / "ds", {"classes": ["a", "b"], "ignore_index": 7}, masks)
    with pytest.warns(UserWarning) as caught:  # the command prints each as one line `tmtseg: warning: ...`
        result = run("data", "check", str(root))
    assert result.returncode == 0 and result.stdout == ""
    assert [str(w.message) for w in caught] == [
        f"data.train: mask value 7 (dataset.yaml ignore_index) is ignored on 30.0% of the mask pixels of {root}"
        " (above data.max_ignore_share=0.2); make sure it means don't-care"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none now
        assert run("data", "check", str(root), "data.max_ignore_share=0.5").returncode == 0


def test_an_explicit_ignore_index_255_keeps_255_as_dont_care_and_the_class_check_catches_it(tmp_path):
    """`ignore_index: 255` says 255 really is void: decoded so, and then the training split holds no polyp pixel."""
    root = write_folder(tmp_path / "k", {"classes": ["background", "polyp"], "ignore_index": 255}, binary_masks())
    assert check_split(folder(root), DataConfig(num_classes=2)) == []
    assert {int(v) for lb in labels(root, 2) for v in np.unique(lb)} == {0, 255}
    result = run("data", "check", str(root))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"data.train: class 'polyp' is in none of the 3 masks of {root}, so the model cannot learn it; check the masks"
        " and their decoding (dataset.yaml), or set data.allow_missing_classes=true"
    ]


# ------------------------------------------------------------------------------------------ 5. the README's recipes
def readme_dataset_yamls() -> list[dict]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own data, no code", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.+?)\n```", section, flags=re.S)]
    return [b for b in blocks if isinstance(b, dict) and "classes" in b]


def test_the_readme_shows_the_three_mask_formats_and_each_dataset_yaml_works(tmp_path):
    metas = readme_dataset_yamls()
    kinds = ["colors" if "colors" in m else "threshold" if "threshold" in m else "indexed" for m in metas]
    assert sorted(kinds) == ["colors", "indexed", "threshold"]
    for meta, kind in zip(metas, kinds):
        classes = meta["classes"]
        ids = np.arange(100).reshape(10, 10) % len(classes)  # every class
        ids = np.kron(ids, np.ones((4, 4), dtype=np.int64))  # [40, 40]: 4x4 blocks, so JPEG keeps them apart
        if kind == "indexed":
            raw_of = {c: r for r, c in meta.get("id_map", {}).items()} or {c: c for c in range(len(classes))}
            mask, suffix = np.vectorize(raw_of.get)(ids).astype(np.uint8), ".png"
            mask[0, 0] = meta.get("ignore_index", 255)
        elif kind == "threshold":
            mask, suffix = (ids * 255).astype(np.uint8), ".jpg"
        else:
            first = [v if isinstance(v[0], int) else v[0] for v in (meta["colors"][c] for c in classes)]
            mask, suffix = np.array(first, dtype=np.uint8)[ids], ".png"
        root = write_folder(tmp_path / kind, meta, {"a": mask}, suffix=suffix, quality=95)
        result = run("data", "check", str(root))
        assert result.returncode == 0, (kind, result.stdout, result.stderr)
        label = labels(root, len(classes))[0]
        if kind == "indexed":
            assert label[0, 0] == 255
            label[0, 0] = ids[0, 0]
        np.testing.assert_array_equal(label, ids, err_msg=kind)
