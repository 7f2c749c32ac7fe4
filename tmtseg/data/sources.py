"""Where a split's items come from: the real manifest sets, a user folder, Cityscapes, or the synthetic scenes.

``list_source`` turns a :class:`SplitConfig` into a :class:`Source`: sorted records, their decoder,
class names and palette. Config mistakes raise ConfigError; missing metadata files raise DataError.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data import synthetic
from tmtseg.data.decode import (
    Pair,
    PolypDecoder,
    Record,
    RetinaDecoder,
    camvid_decoder,
    cityscapes_decoder,
    id_decoder,
)
from tmtseg.data.folders import folder_source
from tmtseg.data.label_map import IGNORE, MappedDecoder, build_lut, dataset_name
from tmtseg.data.label_regions import with_region_labels
from tmtseg.data.listing import (
    BINARY_PALETTE,
    Source,
    default_palette,
    keep_listed,
    no_groups,
    one_of,
    slice_records,
)
from tmtseg.errors import ConfigError, DataError


@dataclass(frozen=True)
class ManifestSet:
    """One real dataset under the data root: its classes, colours, decoder and grouping rule."""

    class_names: list[str]
    palette: list[list[int]]
    decoder: Callable[..., Callable[[Record], Pair]]  # (ignore_index=...) -> decoder
    group_of: Callable[[dict], str] | None = None  # manifest row -> group id; None = no groups
    void: str | None = ""  # what its labels mark as void (Source.void)


CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_PALETTE = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0],
    [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
]  # fmt: skip

IDD_LEVEL1_CLASSES = ["drivable", "non-drivable", "living things", "vehicles", "roadside objects", "far objects", "sky"]
# the Cityscapes colour of each level-1 class's main member: road, sidewalk, person, car, traffic sign, building, sky
IDD_LEVEL1_PALETTE = [[128, 64, 128], [244, 35, 232], [220, 20, 60], [0, 0, 142], [220, 220, 0], [70, 70, 70],
                      [70, 130, 180]]  # fmt: skip


def _chase_child(row: dict) -> str:
    match = re.match(r"Image_(\d+)[LR]", Path(row["image"]).name)
    return match.group(1) if match else ""


MANIFEST_SETS = {
    "camvid-daydusk": ManifestSet(
        class_names=["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                     "Pedestrian", "Bicyclist"],
        palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                 [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]],
        decoder=camvid_decoder,
        group_of=lambda row: row["sequence"],
        void="label value 11 (void)",
    ),
    "polyp-multicenter": ManifestSet(
        class_names=["background", "polyp"], palette=BINARY_PALETTE.tolist(), decoder=lambda **_: PolypDecoder()
    ),
    "retina-vessels": ManifestSet(
        class_names=["background", "vessel"], palette=BINARY_PALETTE.tolist(), decoder=RetinaDecoder,
        group_of=lambda row: _chase_child(row) if row["domain"] == "chase_db1" else "",
        void=None,  # outside the field of view
    ),
    "idd-lite": ManifestSet(  # level-1 ids 0-6, 255 = void; a sequence folder is one drive
        class_names=IDD_LEVEL1_CLASSES, palette=IDD_LEVEL1_PALETTE,
        decoder=lambda *, ignore_index: id_decoder(num_classes=7, raw_ignore=255, ignore_index=ignore_index),
        group_of=lambda row: row["sequence"], void="label value 255 (void)",
    ),
    "bdd100k-sample": ManifestSet(  # palette PNG whose index is the Cityscapes trainId, 255 = void
        class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE,
        decoder=lambda *, ignore_index: id_decoder(num_classes=19, raw_ignore=255, ignore_index=ignore_index),
        void="label value 255 (void)",
    ),
}  # fmt: skip


def resolve_data_root(root: str) -> Path:
    """``""`` -> ./../shared/data or <repo>/../shared/data, whichever exists first; else ``root`` itself."""
    if root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"{root}: data root not found")
        return path
    repo = Path(__file__).resolve().parents[2]
    candidates = [Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise DataError(f"{candidates[0]} (or {candidates[1]}): data root not found")


def _manifest(split: SplitConfig, data: DataConfig, key: str) -> Source:
    one_of(f"{key}.dataset", split.dataset, set(MANIFEST_SETS))
    spec = MANIFEST_SETS[split.dataset]
    folder = resolve_data_root(data.root) / split.dataset
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found")
    rows = read_manifest(manifest)
    label_col = "label" if "label" in rows[0] else "mask"
    one_of(f"{key}.domain", split.domain, {r["domain"] for r in rows})
    rows = [r for r in rows if r["domain"] == split.domain]
    for role in split.roles:
        one_of(f"{key}.roles", role, {r["suggested_role"] for r in rows})
    if split.roles:
        rows = [r for r in rows if r["suggested_role"] in split.roles]
    if spec.group_of is None:
        no_groups(split, key, split.dataset)
    elif split.groups:
        groups = {spec.group_of(r) for r in rows} - {""}
        if not groups:
            raise ConfigError(f"config key {key}.groups: domain {split.domain!r} of {split.dataset} has no groups")
        for group in split.groups:
            one_of(f"{key}.groups", group, groups)
        rows = [r for r in rows if spec.group_of(r) in split.groups]
    rows.sort(key=lambda r: (Path(r["image"]).name, r["image"]))
    records = []
    for r in rows:
        rel = Path(r["image"])
        parts = [p for p in rel.parent.parts if p != "images"]
        records.append(
            Record(
                name="_".join([*parts, rel.stem]),
                image=folder / r["image"],
                label=folder / r[label_col] if r[label_col] else None,
                fov=folder / r["fov"] if r.get("fov") else None,
                domain=r["domain"],
                group=spec.group_of(r) if spec.group_of else "",
            )
        )
    return Source(
        records=slice_records(split, records, key),
        decoder=spec.decoder(ignore_index=data.ignore_index),
        class_names=list(spec.class_names),
        palette=np.array(spec.palette, dtype=np.uint8),
        where=f"{folder} (domain={split.domain}, roles={split.roles or 'all'})",
        void=spec.void,
    )


def read_manifest(manifest: Path) -> list[dict]:
    """The rows of a manifest.csv; a missing column, a row with too few or too many fields, a file path that leads
    outside the manifest's folder, or a file that is not CSV text is a DataError naming the file (and the line)."""
    try:
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{manifest}: not a readable CSV file ({str(err).splitlines()[0]})") from None
    except OSError as err:
        raise DataError(f"{manifest}: cannot read the manifest ({err.strerror})") from None
    needed = {"image", "label" if "label" in header else "mask", "domain", "suggested_role"}
    if not rows or not needed <= set(header):
        missing = ", ".join(sorted(needed - set(header))) or "every row"
        raise DataError(
            f"{manifest}: expected columns image, label (or mask), domain, suggested_role (missing: {missing})"
        )
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row or None in row.values():  # DictReader's marks of a long and of a short row
            fields = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
            raise DataError(f"{manifest}: line {line} has {fields} fields, the header has {len(header)}")
    root, resolve = manifest.parent.resolve(), _folder_resolver()
    for line, row in enumerate(rows, start=2):
        _refuse_outside(manifest, root, line, row, resolve)
    return rows


def _folder_resolver() -> Callable[[Path], Path]:
    """Path.resolve with each folder resolved once: a file's real path is its folder's real path and its name, unless
    the name is itself a symlink (or `..`). The same paths as resolve(), at one lstat a file instead of one per path
    component: a manifest of thousands of rows in a few folders was seconds of resolving, at every config load."""
    folders: dict[Path, Path] = {}

    def resolve(path: Path) -> Path:
        if path.name in ("", "..") or path.is_symlink():
            return path.resolve()
        folder = folders.get(path.parent)
        if folder is None:
            folder = folders[path.parent] = path.parent.resolve()
        return folder / path.name

    return resolve


def _refuse_outside(manifest: Path, root: Path, line: int, row: dict, resolve: Callable[[Path], Path]) -> None:
    """A row's files must resolve inside the manifest's folder: a shared manifest must not make a run read (and a
    prediction or an error message show) files elsewhere on the machine, by `..`, an absolute path or a symlink."""
    inside = str(root).rstrip("/") + "/"  # root in real.parents, as text: both are absolute and resolved
    for column in ("image", "label", "mask", "fov"):
        value = row.get(column) or ""
        if value and not str(resolve(manifest.parent / value)).startswith(inside):
            raise DataError(f"{manifest}: line {line}: {column} {value} leads outside the manifest's folder {root}")


def _cityscapes(split: SplitConfig, data: DataConfig, key: str) -> Source:
    """leftImg8bit/<domain>/<city>/*_leftImg8bit.png with gtFine/<domain>/<city>/*_gtFine_labelIds.png."""
    root = Path(split.path)
    images_dir = root / "leftImg8bit" / split.domain
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found (split.domain is the Cityscapes split: train, val)")
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"), key=lambda p: (p.name, str(p)))
    cities = {p.parent.name for p in images}
    for group in split.groups:
        one_of(f"{key}.groups", group, cities)
    records = []
    for p in images:
        if split.groups and p.parent.name not in split.groups:
            continue
        stem = p.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split.domain / p.parent.name / f"{stem}_gtFine_labelIds.png"
        records.append(Record(name=stem, image=p, label=label, domain=split.domain, group=p.parent.name))
    return Source(
        records=slice_records(split, records, key),
        decoder=cityscapes_decoder(ignore_index=data.ignore_index),
        class_names=list(CITYSCAPES_CLASSES),
        palette=np.array(CITYSCAPES_PALETTE, dtype=np.uint8),
        where=str(images_dir),
        void="label ids outside the 19 train ids",
    )


def _synthetic(split: SplitConfig, data: DataConfig, key: str) -> Source:
    one_of(f"{key}.domain", split.domain, set(synthetic.DOMAINS))
    no_groups(split, key, "the synthetic set")
    if split.roles:
        raise ConfigError(f"config key {key}.roles={split.roles}: the synthetic set has no roles")
    if split.seed < 0 or split.num_images < 0:
        raise ConfigError(f"config key {key}.seed/num_images: must be >= 0")
    records = [
        Record(name=f"synthetic_{split.domain}_{split.seed}_{i:05d}", domain=split.domain, index=i)
        for i in range(split.num_images)
    ]
    return Source(
        records=slice_records(split, records, key),
        decoder=synthetic.SyntheticDecoder(domain=split.domain, seed=split.seed),
        class_names=list(synthetic.CLASS_NAMES),
        palette=synthetic.PALETTE.copy(),
        where=f"synthetic {split.domain} scenes (seed {split.seed})",
    )


SOURCES = {"manifest": _manifest, "folder": folder_source, "cityscapes": _cityscapes, "synthetic": _synthetic}


def list_source(split: SplitConfig, data: DataConfig, *, key: str = "split", check_classes: bool = True) -> Source:
    """The split's records (possibly none), decoder, class names and palette; data.label_map applied.

    ``check_classes``: data.num_classes must equal the dataset's class count (off for data checks,
    whose decoding does not depend on it).
    """
    one_of(f"{key}.kind", split.kind, set(SOURCES))
    if split.kind in ("folder", "cityscapes") and not split.path:
        raise ConfigError(f"config key {key}.path: a {split.kind} split needs the dataset directory")
    source = SOURCES[split.kind](split, data, key)
    if split.files:  # e.g. the images `tmtseg advise` chose
        source.records = keep_listed(split, source.records, key)
    name = dataset_name(split.kind, split.dataset, split.path)
    if name in data.label_map:  # the dataset's classes -> the task's (data.class_names)
        lut = build_lut(data.label_map[name], source_classes=source.class_names, task_classes=list(data.class_names),
                        ignore_index=data.ignore_index, key=f"data.label_map.{name}")  # fmt: skip
        source.decoder = MappedDecoder(source.decoder, lut)
        dropped = [c for c in source.class_names if data.label_map[name][c] == IGNORE]
        if dropped and source.void is not None:
            mapped = f"class(es) {', '.join(map(repr, dropped))} (data.label_map.{name}: ignore)"
            source.void = f"{source.void} and {mapped}" if source.void else mapped
        source.class_names = list(data.class_names)
        source.palette = default_palette(len(source.class_names))  # one palette for every dataset mapped to the task
    if split.label_regions:  # the ground truth inside the chosen regions only (data/label_regions.py)
        cut = split.label_regions
        source.decoder = with_region_labels(
            source.decoder, cut, ignore_index=data.ignore_index, key=key, pseudo=split.pseudo_labels
        )
    elif split.pseudo_labels:
        raise ConfigError(f"config key {key}.pseudo_labels: fills the pixels outside {key}.label_regions; set that too")
    num_classes = len(source.class_names)
    if check_classes and data.num_classes != num_classes:
        raise ConfigError(f"config key data.num_classes={data.num_classes}: {source.where} has {num_classes} classes")
    if 0 <= data.ignore_index < num_classes:
        raise ConfigError(f"config key data.ignore_index={data.ignore_index}: collides with a class id")
    if check_classes and data.class_names:
        if len(data.class_names) != num_classes:
            raise ConfigError(f"config key data.class_names: {len(data.class_names)} names for {num_classes} classes")
        source.class_names = list(data.class_names)
    return source
