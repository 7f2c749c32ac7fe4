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
import yaml

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data import synthetic
from tmtseg.data.decode import (
    ColourDecoder,
    Pair,
    PolypDecoder,
    Record,
    RetinaDecoder,
    ThresholdDecoder,
    camvid_decoder,
    cityscapes_decoder,
    folder_decoder,
    id_decoder,
)
from tmtseg.data.label_map import IGNORE, MappedDecoder, build_lut, dataset_name
from tmtseg.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
BINARY_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)


@dataclass
class Source:
    records: list[Record]
    decoder: Callable[[Record], Pair]
    class_names: list[str]
    palette: np.ndarray  # [K, 3] uint8
    where: str  # what the split reads, for messages
    # what decodes to ignore_index, named by the data checks' warning when it covers much of a split ("" = nothing);
    # None: void by design (the retina sets' outside of the field of view), never warned about
    void: str | None = ""


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


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: distinct colours for any number of classes. [K, 3] uint8."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, rgb = k, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        out[k] = rgb
    return out


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


def _slice(split: SplitConfig, records: list[Record], key: str) -> list[Record]:
    if split.start < 0 or (split.stop is not None and split.stop < split.start):
        raise ConfigError(f"config key {key}.start/stop=[{split.start}, {split.stop}): need 0 <= start <= stop")
    return records[split.start : split.stop]


def _no_groups(split: SplitConfig, key: str, what: str) -> None:
    if split.groups:
        raise ConfigError(f"config key {key}.groups={split.groups}: {what} has no groups")


def _one_of(key: str, value: object, allowed: set[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(sorted(allowed))}")


def _manifest(split: SplitConfig, data: DataConfig, key: str) -> Source:
    _one_of(f"{key}.dataset", split.dataset, set(MANIFEST_SETS))
    spec = MANIFEST_SETS[split.dataset]
    folder = resolve_data_root(data.root) / split.dataset
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found")
    rows = read_manifest(manifest)
    label_col = "label" if "label" in rows[0] else "mask"
    _one_of(f"{key}.domain", split.domain, {r["domain"] for r in rows})
    rows = [r for r in rows if r["domain"] == split.domain]
    for role in split.roles:
        _one_of(f"{key}.roles", role, {r["suggested_role"] for r in rows})
    if split.roles:
        rows = [r for r in rows if r["suggested_role"] in split.roles]
    if spec.group_of is None:
        _no_groups(split, key, split.dataset)
    elif split.groups:
        groups = {spec.group_of(r) for r in rows} - {""}
        if not groups:
            raise ConfigError(f"config key {key}.groups: domain {split.domain!r} of {split.dataset} has no groups")
        for group in split.groups:
            _one_of(f"{key}.groups", group, groups)
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
        records=_slice(split, records, key),
        decoder=spec.decoder(ignore_index=data.ignore_index),
        class_names=list(spec.class_names),
        palette=np.array(spec.palette, dtype=np.uint8),
        where=f"{folder} (domain={split.domain}, roles={split.roles or 'all'})",
        void=spec.void,
    )


def read_manifest(manifest: Path) -> list[dict]:
    """The rows of a manifest.csv; a missing column, a row with too few or too many fields, or a file that is not CSV
    text is a DataError naming the file (and the line)."""
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
    return rows


FOLDER_KEYS = {"classes", "ignore_index", "id_map", "palette", "threshold", "colors", "color_tolerance"}
COLOR_TOLERANCE = 48  # JPEG noise on a flat colour stays within ~16 per channel; seams are handled apart (decode.py)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _rgb_list(value: object) -> list[list[int]] | None:
    """One [r, g, b] or a list of them -> a list of colours; None if it is neither."""
    if isinstance(value, list) and value and not isinstance(value[0], list):
        value = [value]
    ok = isinstance(value, list) and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                                    for v in c) for c in value)  # fmt: skip
    return value if ok and value else None


def _check_folder_formats(path: Path, meta: dict, classes: list[str]) -> None:
    """The keys that say how masks are decoded: indexed (ignore_index, id_map), threshold, colors; one format each."""
    given = [k for k in ("threshold", "colors") if k in meta]
    if len(given) > 1:
        raise ConfigError(f"{path}: keys 'threshold' and 'colors' exclude each other (binary or colour masks)")
    for k in given:
        for indexed in ("id_map", "ignore_index"):
            if indexed in meta:
                why = "every value is a class" if k == "threshold" else "void is the colour listed under ignore"
                raise ConfigError(f"{path}: key {indexed!r} does not apply with {k!r} ({why}); remove it")
    if "threshold" in meta:
        if len(classes) != 2:
            raise ConfigError(f"{path}: key 'threshold' is for 2 classes (background, foreground), not {len(classes)}")
        if not _number(meta["threshold"]) or meta["threshold"] <= 0:
            raise ConfigError(f"{path}: key 'threshold' must be a number > 0 (mask values >= it are {classes[1]!r})")
    if "color_tolerance" in meta:
        tol = meta["color_tolerance"]
        if "colors" not in meta:
            raise ConfigError(f"{path}: key 'color_tolerance' applies to colour masks only (key 'colors')")
        if not isinstance(tol, int) or isinstance(tol, bool) or not 0 <= tol <= 255:
            raise ConfigError(f"{path}: key 'color_tolerance' must be an integer in [0, 255]")
    if "colors" in meta:
        colors = meta["colors"]
        if not isinstance(colors, dict) or not colors:
            raise ConfigError(f"{path}: key 'colors' must map each class name to [r, g, b] (or a list of them)")
        seen: dict[tuple[int, ...], str] = {}
        for name, value in colors.items():
            if name not in classes and name != IGNORE:
                raise ConfigError(f"{path}: colors.{name}: not a class ({', '.join(classes)}) nor {IGNORE!r}")
            rgbs = _rgb_list(value)
            if rgbs is None:
                raise ConfigError(f"{path}: colors.{name} must be [r, g, b] (0-255) or a list of them")
            for c in rgbs:
                if tuple(c) in seen:
                    raise ConfigError(f"{path}: colors.{name}: {c} is listed for {seen[tuple(c)]!r} too")
                seen[tuple(c)] = name
        missing = [c for c in classes if c not in colors]
        if missing:
            raise ConfigError(f"{path}: key 'colors' gives no colour for class(es) {', '.join(map(repr, missing))}")


def _read_folder_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: dataset.yaml not found (a folder dataset needs classes: [names])")
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: must hold a mapping with key classes")
    for k in meta:
        if k not in FOLDER_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} (known: {', '.join(sorted(FOLDER_KEYS))})")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{path}: key 'classes' must be a non-empty list of names")
    if not isinstance(meta.get("ignore_index", 255), int) or meta.get("ignore_index", 255) < 0:
        raise ConfigError(f"{path}: key 'ignore_index' must be a non-negative integer")
    id_map = meta.get("id_map") or {}
    ok = isinstance(id_map, dict) and all(
        isinstance(a, int) and a >= 0 and isinstance(b, int) and 0 <= b < len(classes) for a, b in id_map.items()
    )
    if not ok:
        raise ConfigError(f"{path}: key 'id_map' must map raw values >= 0 to class ids in [0, {len(classes)})")
    if "ignore_index" in meta and meta["ignore_index"] in id_map:
        v = meta["ignore_index"]
        raise ConfigError(f"{path}: value {v} is both the ignore_index and in id_map (-> {id_map[v]}); keep one")
    palette = meta.get("palette")
    if palette is not None:
        arr = np.asarray(palette)
        if arr.shape != (len(classes), 3) or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise ConfigError(f"{path}: key 'palette' must be one [r, g, b] (0-255) per class")
    _check_folder_formats(path, meta, classes)
    return meta


def _folder_decoder(path: Path, meta: dict, data: DataConfig) -> tuple[Callable[[Record], Pair], str]:
    """The decoder dataset.yaml asks for, and what it decodes to void (Source.void)."""
    classes = list(meta["classes"])
    if "threshold" in meta:
        return ThresholdDecoder(threshold=meta["threshold"]), ""
    if "colors" in meta:
        colours, ids, names = [], [], []
        for name, value in meta["colors"].items():
            for c in _rgb_list(value) or []:
                colours.append(c)
                ids.append(data.ignore_index if name == IGNORE and IGNORE not in classes else classes.index(name))
                names.append(name)
        void = [c for c, n in zip(colours, names) if n == IGNORE and IGNORE not in classes]
        decoder = ColourDecoder(colours=np.array(colours), ids=np.array(ids), names=names,
                                tolerance=meta.get("color_tolerance", COLOR_TOLERANCE))  # fmt: skip
        return decoder, f"colour {', '.join(map(str, void))} (colors: ignore)" if void else ""
    id_map = dict(meta.get("id_map") or {})
    # the default ignore value 255 gives way to a class id_map gives it ({0: 0, 255: 1} for 0/255 masks)
    raw_ignore = None if "ignore_index" not in meta and 255 in id_map else int(meta.get("ignore_index", 255))
    guard = ""
    if len(classes) == 2 and not meta.get("id_map") and "ignore_index" not in meta:
        guard = (
            f"{path}: masks holding only 0 and 255, where 255 is the default ignore value: every {classes[1]!r} pixel"
            " would be don't-care; add 'threshold: 128' (or 'id_map: {0: 0, 255: 1}') to it, or 'ignore_index: 255'"
            " if 255 really means don't-care"
        )
    decoder = folder_decoder(num_classes=len(classes), ignore_index=data.ignore_index, raw_ignore=raw_ignore,
                             id_map=id_map, binary_guard=guard)  # fmt: skip
    return decoder, "" if raw_ignore is None else f"mask value {raw_ignore} (dataset.yaml ignore_index)"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder(split: SplitConfig, data: DataConfig, key: str) -> Source:
    _no_groups(split, key, "a folder dataset")
    root = Path(split.path)
    meta = _read_folder_yaml(root / "dataset.yaml")
    classes = list(meta["classes"])
    masks: dict[str, Path] = {}
    for m in _images_in(root / "masks"):
        masks.setdefault(m.stem, m)
    records = [Record(name=p.stem, image=p, label=masks.get(p.stem)) for p in _images_in(root / "images")]
    records.sort(key=lambda r: (r.image.name, str(r.image)))
    decoder, void = _folder_decoder(root / "dataset.yaml", meta, data)
    palette = meta.get("palette")
    if palette is None and "colors" in meta:  # shown in the colours the masks use
        palette = [(_rgb_list(meta["colors"][c]) or [[0, 0, 0]])[0] for c in classes]
    return Source(
        records=_slice(split, records, key),
        decoder=decoder,
        class_names=classes,
        palette=np.array(palette, dtype=np.uint8) if palette is not None else default_palette(len(classes)),
        where=str(root),
        void=void,
    )


def _cityscapes(split: SplitConfig, data: DataConfig, key: str) -> Source:
    """leftImg8bit/<domain>/<city>/*_leftImg8bit.png with gtFine/<domain>/<city>/*_gtFine_labelIds.png."""
    root = Path(split.path)
    images_dir = root / "leftImg8bit" / split.domain
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found (split.domain is the Cityscapes split: train, val)")
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"), key=lambda p: (p.name, str(p)))
    cities = {p.parent.name for p in images}
    for group in split.groups:
        _one_of(f"{key}.groups", group, cities)
    records = []
    for p in images:
        if split.groups and p.parent.name not in split.groups:
            continue
        stem = p.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split.domain / p.parent.name / f"{stem}_gtFine_labelIds.png"
        records.append(Record(name=stem, image=p, label=label, domain=split.domain, group=p.parent.name))
    return Source(
        records=_slice(split, records, key),
        decoder=cityscapes_decoder(ignore_index=data.ignore_index),
        class_names=list(CITYSCAPES_CLASSES),
        palette=np.array(CITYSCAPES_PALETTE, dtype=np.uint8),
        where=str(images_dir),
        void="label ids outside the 19 train ids",
    )


def _synthetic(split: SplitConfig, data: DataConfig, key: str) -> Source:
    _one_of(f"{key}.domain", split.domain, set(synthetic.DOMAINS))
    _no_groups(split, key, "the synthetic set")
    if split.roles:
        raise ConfigError(f"config key {key}.roles={split.roles}: the synthetic set has no roles")
    if split.seed < 0 or split.num_images < 0:
        raise ConfigError(f"config key {key}.seed/num_images: must be >= 0")
    records = [
        Record(name=f"synthetic_{split.domain}_{split.seed}_{i:05d}", domain=split.domain, index=i)
        for i in range(split.num_images)
    ]
    return Source(
        records=_slice(split, records, key),
        decoder=synthetic.SyntheticDecoder(domain=split.domain, seed=split.seed),
        class_names=list(synthetic.CLASS_NAMES),
        palette=synthetic.PALETTE.copy(),
        where=f"synthetic {split.domain} scenes (seed {split.seed})",
    )


SOURCES = {"manifest": _manifest, "folder": _folder, "cityscapes": _cityscapes, "synthetic": _synthetic}


def list_source(split: SplitConfig, data: DataConfig, *, key: str = "split", check_classes: bool = True) -> Source:
    """The split's records (possibly none), decoder, class names and palette; data.label_map applied.

    ``check_classes``: data.num_classes must equal the dataset's class count (off for data checks,
    whose decoding does not depend on it).
    """
    _one_of(f"{key}.kind", split.kind, set(SOURCES))
    if split.kind in ("folder", "cityscapes") and not split.path:
        raise ConfigError(f"config key {key}.path: a {split.kind} split needs the dataset directory")
    source = SOURCES[split.kind](split, data, key)
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
