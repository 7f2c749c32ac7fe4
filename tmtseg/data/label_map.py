"""Class mapping: a dataset's classes put into a task's (``data.label_map``), and the class shares that check it.

A mapping names every class of the dataset, each to a task class or to ``ignore``; it becomes one lookup table applied
to the decoded label, so that datasets with other label sets (CamVid's 11 classes, BDD100K's 19) train and score in one
task's label space (IDD's 7 level-1 classes) without code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tmtseg.data.decode import Pair, Record
from tmtseg.errors import ConfigError

IGNORE = "ignore"  # the mapping target that turns a class into void


def dataset_name(kind: str, dataset: str, path: str) -> str:
    """The name a split's dataset has in data.label_map: the manifest folder, else the dataset directory's name."""
    return dataset if kind == "manifest" else kind if kind == "synthetic" else Path(path).name


def build_lut(
    mapping: dict[str, str], *, source_classes: list[str], task_classes: list[str], ignore_index: int, key: str
) -> np.ndarray:
    """The table dataset class id (or ignore_index) -> task class id (or ignore_index). [max(Ks, ignore+1)] int64.

    Every source class must be mapped, to a task class or to ``ignore``; an unknown source class, an unknown
    target or an unmapped class is a ConfigError naming it and ``key``.
    """
    if not task_classes:
        raise ConfigError(f"config key {key}: a label map needs data.class_names (the task's classes)")
    if ignore_index < 0:
        raise ConfigError(f"config key data.ignore_index={ignore_index}: must be >= 0 with a label map")
    for name, target in mapping.items():
        if name not in source_classes:
            raise ConfigError(f"config key {key}: {name!r} is not a class of the dataset ({', '.join(source_classes)})")
        if target != IGNORE and target not in task_classes:
            raise ConfigError(
                f"config key {key}.{name}={target!r}: not a task class ({', '.join(task_classes)}) nor {IGNORE!r}"
            )
    unmapped = [c for c in source_classes if c not in mapping]
    if unmapped:
        raise ConfigError(
            f"config key {key}: class(es) {', '.join(map(repr, unmapped))} of the dataset not mapped "
            f"(map each to one of {', '.join(task_classes)} or to {IGNORE!r})"
        )
    lut = np.full(max(len(source_classes), ignore_index + 1), ignore_index, dtype=np.int64)
    for k, name in enumerate(source_classes):
        target = mapping[name]
        lut[k] = ignore_index if target == IGNORE else task_classes.index(target)
    return lut


class MappedDecoder:
    """A dataset's decoder followed by the label map: one vectorised table lookup on the decoded label."""

    def __init__(self, decoder: Callable[[Record], Pair], lut: np.ndarray) -> None:
        self.decoder = decoder
        self.lut = lut

    def __call__(self, record: Record) -> Pair:
        rgb, label = self.decoder(record)
        return rgb, self.lut[label]  # [H, W]: dataset ids -> task ids; ignore_index stays


def class_shares(records: list[Record], decoder: Callable[[Record], Pair], *, num_classes: int) -> np.ndarray:
    """Pixel share of each class over the records' labels, the last entry being every other value (void). [K + 1]"""
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    for record in records:
        label = decoder(record)[1]
        ids = np.where((label >= 0) & (label < num_classes), label, num_classes)  # void -> K
        counts += np.bincount(ids.ravel(), minlength=num_classes + 1)
    return counts / max(1, counts.sum())
