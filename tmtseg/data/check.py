"""Data checks before a run: decode every file of a split, report each problem as one line, and tell what the model
will learn from: each class's share of the mask pixels and the number of masks holding it, per split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tmtseg.config import Config, DataConfig, SplitConfig
from tmtseg.data.sources import list_source
from tmtseg.errors import DataError


@dataclass
class SplitScan:
    """One split, decoded: its problems and its class counts (the last entry of each count is void)."""

    key: str  # data.train, ...
    where: str
    class_names: list[str]
    void: str | None  # what decodes to void (Source.void)
    images: int = 0
    decoded: int = 0  # images whose pair decoded without a problem (the counts are over these)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # [K + 1]
    holding: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # [K + 1] masks holding each
    problems: list[str] = field(default_factory=list)


def scan_split(split: SplitConfig, data: DataConfig, *, key: str = "split") -> SplitScan:
    """Decode every pair of the split once: the problem lines of :func:`check_split` and the class counts."""
    source = list_source(split, data, key=key, check_classes=False)
    k = len(source.class_names)
    scan = SplitScan(key=key, where=source.where, class_names=list(source.class_names), void=source.void,
                     images=len(source.records), pixels=np.zeros(k + 1, dtype=np.int64),
                     holding=np.zeros(k + 1, dtype=np.int64))  # fmt: skip
    if not source.records:
        scan.problems.append(f"{source.where}: empty split ({key} selects no images)")
        return scan
    for record in source.records:
        try:
            label = source.decoder(record)[1]
        except DataError as err:
            if str(err) not in scan.problems:  # a dataset-wide problem (named by dataset.yaml) is one line
                scan.problems.append(str(err))
            continue
        ids = np.where((label >= 0) & (label < k), label, k)  # void -> K
        counts = np.bincount(ids.ravel(), minlength=k + 1)
        scan.pixels += counts
        scan.holding += counts > 0
        scan.decoded += 1
    return scan


def check_split(split: SplitConfig, data: DataConfig, *, key: str = "split") -> list[str]:
    """Lines ``"<path>: <problem>"``, one per bad file (unreadable, truncated, missing label, size
    mismatch, out-of-range ids, colour label), or one line for an empty split. Config mistakes raise;
    data.num_classes is not compared here (build_dataset does that)."""
    return scan_split(split, data, key=key).problems


@dataclass
class DataReport:
    """What :func:`data_report` found: problem lines (a run must not start), warnings, and the scans for the table."""

    scans: list[SplitScan]
    files: list[str]  # bad files (check_split's lines), each once
    classes: list[str]  # classes in no mask of a split the model learns from
    warnings: list[str]
    class_names: list[str]  # the table's rows

    @property
    def problems(self) -> list[str]:
        return self.files + self.classes

    def table(self) -> str:
        """Per split: each class's share of the mask pixels and how many masks hold it; void last."""
        head = ["class"] + [f"{s.key} ({s.images} images{_unread(s)})" for s in self.scans]
        rows = []
        for k, name in enumerate([*self.class_names, "ignore"]):
            cells = []
            for s in self.scans:
                j = len(s.class_names) if k == len(self.class_names) else k  # void is each scan's last entry
                if j >= len(s.pixels) or not s.decoded:  # no such class, or nothing read
                    cells.append("-")
                    continue
                cells.append(f"{_share(s.pixels[j], s.pixels.sum()):>6} {s.holding[j]:>6}")
            rows.append([name, *cells])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["class shares per split: % of mask pixels, masks holding the class"]
        for r in [head, *rows]:
            lines.append("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]))
        return "\n".join(lines)


def _unread(scan: SplitScan) -> str:
    bad = scan.images - scan.decoded
    return f", {bad} unreadable" if bad and scan.images else ""


def _share(count: int, total: int) -> str:
    if count == 0 or total == 0:
        return "0%"
    share = 100.0 * count / total
    return "<0.1%" if share < 0.05 else f"{share:.1f}%"


def data_report(cfg: Config, *, splits: Sequence[str] = ("train", "val")) -> DataReport:
    """Scan data.<split> for each split named (data.source too when adapting): file problems, a class in no mask of
    a split the model learns from (data.train; data.source too when adapting unsupervised) unless
    data.allow_missing_classes, and a warning where void covers more than data.max_ignore_share of a split."""
    names = list(splits)
    if cfg.adapt.source_checkpoint and "source" not in names:
        names.append("source")
    elif not cfg.adapt.source_checkpoint and "source" in names and cfg.data.source == SplitConfig():
        names.remove("source")  # not adapting and never set: the placeholder synthetic split is no data of the task
    learned = {"train", "source"} if cfg.adapt.unsupervised else {"train"}
    scans: list[SplitScan] = []
    files: list[str] = []
    classes: list[str] = []
    warnings: list[str] = []
    done: list[tuple[SplitConfig, SplitScan]] = []
    for name in names:
        split, key = getattr(cfg.data, name), f"data.{name}"
        same = next((s for prev, s in done if prev == split), None)  # train and source often read the same files
        scan = _rekeyed(same, key) if same else scan_split(split, cfg.data, key=key)
        done.append((split, scan))
        scans.append(scan)
        files += [line for line in scan.problems if line not in files]  # train and val may read the same files
        total = int(scan.pixels.sum())
        if name in learned and scan.decoded and not cfg.data.allow_missing_classes:
            for k, cls in enumerate(scan.class_names):
                if scan.pixels[k] == 0:
                    classes.append(
                        f"{key}: class {cls!r} is in none of the {scan.decoded} masks of {scan.where}, so the model"
                        " cannot learn it; check the masks and their decoding (dataset.yaml), or set"
                        " data.allow_missing_classes=true"
                    )
        void = scan.pixels[-1] / total if total else 0.0
        if scan.void is not None and void > cfg.data.max_ignore_share and same is None:
            warnings.append(
                f"{key}: {scan.void or 'void'} is ignored on {void:.1%} of the mask pixels of {scan.where} (above"
                f" data.max_ignore_share={cfg.data.max_ignore_share:g}); make sure it means don't-care"
            )
    given = list(cfg.data.class_names)
    widest = max(scans, key=lambda s: len(s.class_names)).class_names if scans else []
    rows = given if len(given) == len(widest) else widest
    return DataReport(scans=scans, files=files, classes=classes, warnings=warnings, class_names=list(rows))


def _rekeyed(scan: SplitScan, key: str) -> SplitScan:
    return dataclasses.replace(scan, key=key, problems=list(scan.problems))


def check_config(cfg: Config, *, splits: Sequence[str] = ("train", "val")) -> list[str]:
    """``check_split`` over data.<split> for each split named (data.source too when adapting), each bad file once."""
    return data_report(cfg, splits=splits).files
