"""Data: the real manifest sets, user folders, Cityscapes and the synthetic two-domain scenes."""

from tmtseg.data.check import DataReport, check_config, check_split, data_report
from tmtseg.data.dataset import SegDataset, build_dataset, collate
from tmtseg.data.decode import Record
from tmtseg.data.sources import resolve_data_root

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
