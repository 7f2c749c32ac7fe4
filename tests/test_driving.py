"""The driving benchmark's data: IDD-Lite and the BDD100K sample decoded exactly, the driving task's label maps on the
real labels, and the plan of `tmtseg bench driving` (reads /work/shared/data; trains nothing)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tmtseg.cli import main
from tmtseg.config import DataConfig, SplitConfig, load_config
from tmtseg.data import build_dataset, check_config, check_split
from tmtseg.data.sources import list_source
from tmtseg.errors import DataError
from tmtseg.tools.bench import PACKAGED, data_splits, load_bench, plan

DRIVING = str(PACKAGED / "driving.yaml")
TASK = ["drivable", "non-drivable", "living things", "vehicles", "roadside objects", "far objects", "sky"]
CAMVID_TO_TASK = {0: 6, 1: 5, 2: 4, 3: 0, 4: 1, 5: 5, 6: 4, 7: 4, 8: 3, 9: 2, 10: 2}  # the list, by raw value
# Cityscapes trainId -> level-1 id, as written in idd-lite/PROVENANCE.md
BDD_TO_TASK = {0: 0, 1: 1, 9: 1, 11: 2, 12: 2, 13: 3, 14: 3, 15: 3, 16: 3, 17: 3, 18: 3,
               3: 4, 4: 4, 5: 4, 6: 4, 7: 4, 2: 5, 8: 5, 10: 6}  # fmt: skip


def manifest(dataset: str, domain: str, **kw) -> SplitConfig:
    return SplitConfig(kind="manifest", dataset=dataset, domain=domain, **kw)


@pytest.mark.parametrize(
    "dataset, domain, roles, count",
    [("idd-lite", "idd", ["source_train"], 1403), ("idd-lite", "idd", ["source_val"], 204),
     ("bdd100k-sample", "bdd", ["target_adapt"], 16), ("bdd100k-sample", "bdd", ["target_eval"], 8)],
)  # fmt: skip
def test_counts_match_provenance(shared_data, dataset, domain, roles, count):
    source = list_source(manifest(dataset, domain, roles=roles), DataConfig(root=str(shared_data)), check_classes=False)
    assert len(source.records) == count and len({r.name for r in source.records}) == count


def test_idd_lite_decoding_is_exact(shared_data):
    data = DataConfig(root=str(shared_data), num_classes=7, ignore_index=254)  # 254: the void value is really mapped
    ds = build_dataset(manifest("idd-lite", "idd", roles=["source_val"], groups=["518"]), data, train=False)
    assert ds.class_names == TASK and len(ds) == 6 and {r.group for r in ds.records} == {"518"}
    seen = set()
    for i, record in enumerate(ds.records):
        raw = np.asarray(Image.open(record.label))
        item = ds[i]
        assert item["label"].shape == (227, 320)
        np.testing.assert_array_equal(item["label"].numpy(), np.where(raw == 255, 254, raw))
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(record.image)))
        seen |= set(np.unique(raw).tolist())
    assert seen <= {*range(7), 255} and len(seen & set(range(7))) == 7


def test_bdd_palette_indices_are_train_ids(shared_data):
    data = DataConfig(root=str(shared_data), num_classes=19, ignore_index=254)
    ds = build_dataset(manifest("bdd100k-sample", "bdd", roles=["target_eval"], stop=2), data, train=False)
    assert ds.class_names[0] == "road" and ds.class_names[18] == "bicycle"
    for i, record in enumerate(ds.records):
        img = Image.open(record.label)
        assert img.mode == "P"
        raw = np.asarray(img)  # the palette index, no RGB conversion
        label = ds[i]["label"].numpy()
        assert label.shape == (720, 1280) and (raw == 255).any()
        np.testing.assert_array_equal(label, np.where(raw == 255, 254, raw))


def make_bad_idd(root: Path) -> None:
    """A one-frame idd-lite folder whose label holds 7, no level-1 id."""
    folder = root / "idd-lite"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(folder / "images" / "1_image.jpg")
    Image.fromarray(np.full((4, 6), 7, np.uint8)).save(folder / "labels" / "1_label.png")
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "domain", "suggested_role", "sequence"])
        w.writerow(["images/1_image.jpg", "labels/1_label.png", "idd", "source_train", "0"])


def test_idd_value_outside_the_level1_ids_is_a_data_error(tmp_path):
    make_bad_idd(tmp_path)
    lines = check_split(manifest("idd-lite", "idd"), DataConfig(root=str(tmp_path)))
    assert len(lines) == 1 and "1_label.png" in lines[0] and "7" in lines[0]
    with pytest.raises(DataError, match="1_label.png"):
        build_dataset(manifest("idd-lite", "idd"), DataConfig(root=str(tmp_path), num_classes=7), train=False)[0]


def test_driving_label_maps_on_the_real_labels(shared_data):
    """CamVid and BDD through configs/driving.yaml: each pixel where the issue's table sends it."""
    data = replace(load_config([DRIVING]).data, root=str(shared_data))
    for dataset, domain, table, void in [("camvid-daydusk", "dusk", CAMVID_TO_TASK, 11),
                                         ("bdd100k-sample", "bdd", BDD_TO_TASK, 255)]:  # fmt: skip
        ds = build_dataset(manifest(dataset, domain, stop=2), data, train=False)
        assert ds.class_names == TASK and ds.num_classes == 7
        lut = np.full(256, 255)
        for raw_id, task_id in table.items():
            lut[raw_id] = task_id
        for i, record in enumerate(ds.records):
            raw = np.asarray(Image.open(record.label))
            assert (raw == void).any()
            np.testing.assert_array_equal(ds[i]["label"].numpy(), lut[raw])


def test_data_check_is_clean_on_both_new_folders_and_the_driving_config(shared_data):
    """Every IDD-Lite and BDD100K label (1631 files) decodes, plain and through the driving task's maps."""
    plain = DataConfig(root=str(shared_data))
    cfg = load_config([DRIVING], [f"data.root={shared_data}"])
    for dataset, domain in [("idd-lite", "idd"), ("bdd100k-sample", "bdd")]:
        assert check_split(manifest(dataset, domain), plain) == []
    assert check_split(manifest("bdd100k-sample", "bdd"), cfg.data) == []
    assert check_config(cfg, splits=("train", "val", "source")) == []


def test_driving_bench_plan(shared_data):
    bench, base = load_bench("driving", [f"data_root={shared_data}"])
    p = plan(bench, base)
    pairs = {r.pair for r in p.runs if "->" in r.pair}
    assert pairs == {"day->dusk", "day->idd", "dusk->day", "dusk->idd", "idd->day", "idd->dusk", "day->bdd", "idd->bdd"}
    by_method: dict[str, int] = {}
    for r in p.runs:
        by_method[r.method] = by_method.get(r.method, 0) + 1
    assert by_method == {"source": 3, "source-only": 8, "finetune": 8, "lora": 8, "dann": 8, "tvt": 8, "tmt-paper": 8,
                         "lwf": 8, "tmt": 8, "target-only": 4}  # fmt: skip
    assert {r.pair for r in p.runs if r.method == "source"} == {"day", "dusk", "idd"}  # bdd: a target only
    by_key = {r.key: r for r in p.runs}
    for r in p.runs:
        assert r.cfg.data.num_classes == 7 and r.cfg.data.class_names == TASK
        assert r.cfg.data.root == str(shared_data) and r.cfg.model.backbone.pretrained == "dinov2_vits14"
    # the targets' splits: IDD by sequence folder into halves, BDD by its own split, dusk by order
    idd = by_key["driving/day->idd/tmt/seed0"].cfg
    assert idd.data.train.groups[0] == "3" and idd.data.val.groups[0] == "215" and idd.data.train.scale == 0.75
    assert not set(idd.data.train.groups) & set(idd.data.val.groups)
    assert idd.data.source == by_key["driving/day/source/seed0"].cfg.data.train  # the unlabelled source images
    sizes = {name: len(list_source(getattr(idd.data, name), idd.data).records) for name in ("train", "val")}
    assert sizes == {"train": 102, "val": 102}
    bdd = by_key["driving/idd->bdd/finetune/seed0"].cfg
    assert bdd.data.train.roles == ["target_adapt"] and bdd.data.val.roles == ["target_eval"]
    dusk = by_key["driving/idd->dusk/dann/seed0"].cfg
    assert (dusk.data.train.start, dusk.data.train.stop, dusk.data.val.start) == (0, 31, 31)
    day = by_key["driving/dusk->day/finetune/seed0"].cfg
    assert day.data.train.groups == ["0006R0"] and day.data.val.groups == ["0016E5"]
    assert by_key["driving/idd->day/source-only/seed0"].kind == "eval"
    full = bench.profiles["full"]  # the same pairs for 3 seeds (planning it costs ~3x this test: not repeated)
    assert full.seeds == [0, 1, 2] and full.pairs == "core" and not (full.source or full.adapt or full.target_only)
    assert bench.profiles["quick"].seeds == [0] and bench.profile == "quick"


def test_every_split_of_the_driving_bench_selects_images(shared_data):
    bench, base = load_bench("driving", [f"data_root={shared_data}"])
    configs = data_splits(bench, base)
    assert len(configs) == 13  # day, dusk, idd: train, val, adapt, eval (dusk has no val); bdd: adapt, eval
    for cfg in configs:
        assert cfg.data.num_classes == 7 and list_source(cfg.data.train, cfg.data).records


def test_data_check_on_a_bench_config_checks_every_split(tmp_path, capsys):
    """`tmtseg data check BENCH.yaml`: each bad file once, though two splits read it; exit code 2."""
    make_bad_idd(tmp_path / "root")
    split = {"kind": "manifest", "dataset": "idd-lite", "domain": "idd"}
    bench = {"data_root": str(tmp_path / "root"),
             "tasks": {"t": {"config": DRIVING, "domains": {"idd": {"train": split, "eval": split}}}}}  # fmt: skip
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    assert main(["data", "check", str(tmp_path / "bench.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out.count("1_label.png") == 1 and "in 2 split group(s)" in err


def test_class_shares_script_prints_before_and_after(shared_data, capsys):
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "class_shares.py"))
    assert script["main"](["-c", DRIVING, "bdd100k-sample:bdd"]) == 0
    out = capsys.readouterr().out
    assert "| road | 19.76 | drivable |" in out and "| void | 15.92 | ignore |" in out  # BDD's PROVENANCE.md
    assert "| vehicles | 11.16 |" in out and "| ignore | 15.92 |" in out  # car 8.63 + truck 1.47 + bus 1.04 + ...
