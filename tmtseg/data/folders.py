"""A user's own folder: images/ and masks/ (or labels/) with a dataset.yaml naming the classes and how masks are
stored (indexed ids with an optional id_map, binary with a threshold, or RGB colours)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data.decode import Pair, Record
from tmtseg.data.label_map import IGNORE
from tmtseg.data.listing import IMAGE_SUFFIXES, Source, default_palette, no_groups, slice_records
from tmtseg.data.mask_formats import ColourDecoder, ThresholdDecoder, folder_decoder
from tmtseg.errors import ConfigError, DataError

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


def read_folder_yaml(path: Path) -> dict:
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


def folder_source(split: SplitConfig, data: DataConfig, key: str) -> Source:
    no_groups(split, key, "a folder dataset")
    root = Path(split.path)
    meta = read_folder_yaml(root / "dataset.yaml")
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
        records=slice_records(split, records, key),
        decoder=decoder,
        class_names=classes,
        palette=np.array(palette, dtype=np.uint8) if palette is not None else default_palette(len(classes)),
        where=str(root),
        void=void,
    )
