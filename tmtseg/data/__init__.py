"""Data: the real manifest sets, user folders, Cityscapes and the synthetic two-domain scenes."""

from .check import check_config, check_split
from .dataset import SegDataset, build_dataset, collate
from .decode import Record
from .sources import resolve_data_root

__all__ = [
    "Record",
    "SegDataset",
    "build_dataset",
    "check_config",
    "check_split",
    "collate",
    "resolve_data_root",
]
