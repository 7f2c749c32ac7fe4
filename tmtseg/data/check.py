"""Data checks before a run: decode every file of a split and report each problem as one line."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config, DataConfig, SplitConfig
from ..errors import DataError
from .sources import list_source


def check_split(split: SplitConfig, data: DataConfig, *, key: str = "split") -> list[str]:
    """Lines ``"<path>: <problem>"``, one per bad file (unreadable, truncated, missing label, size
    mismatch, out-of-range ids, colour label), or one line for an empty split. Config mistakes raise;
    data.num_classes is not compared here (build_dataset does that)."""
    source = list_source(split, data, key=key, check_classes=False)
    if not source.records:
        return [f"{source.where}: empty split ({key} selects no images)"]
    problems = []
    for record in source.records:
        try:
            source.decoder(record)
        except DataError as err:
            if str(err) not in problems:  # a dataset-wide problem (named by dataset.yaml) is one line
                problems.append(str(err))
    return problems


def check_config(cfg: Config, *, splits: Sequence[str] = ("train", "val")) -> list[str]:
    """``check_split`` over data.<split> for each split named (data.source too when adapting)."""
    names = list(splits)
    if cfg.adapt.source_checkpoint and "source" not in names:
        names.append("source")
    lines: list[str] = []
    for name in names:
        for line in check_split(getattr(cfg.data, name), cfg.data, key=f"data.{name}"):
            if line not in lines:  # train and val may read the same files
                lines.append(line)
    return lines
