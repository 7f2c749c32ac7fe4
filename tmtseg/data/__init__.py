"""Data: the real manifest sets, user folders, Cityscapes and the synthetic two-domain scenes."""

from tmtseg.data.check import check_config, check_split
from tmtseg.data.dataset import SegDataset, build_dataset, collate
from tmtseg.data.decode import Record
from tmtseg.data.sources import resolve_data_root

__all__ = [
    "Record",
    "SegDataset",
    "build_dataset",
    "check_config",
    "check_split",
    "collate",
    "resolve_data_root",
]
