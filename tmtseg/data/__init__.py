"""Data: the real manifest sets, user folders, Cityscapes and the synthetic two-domain scenes."""

from .check import DataReport, check_config, check_split, data_report
from .dataset import SegDataset, build_dataset, collate
from .decode import Record
from .sources import resolve_data_root

__all__ = [
    "DataReport",
    "Record",
    "SegDataset",
    "build_dataset",
    "check_config",
    "check_split",
    "collate",
    "data_report",
    "resolve_data_root",
]
