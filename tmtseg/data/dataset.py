"""The segmentation dataset: decode a record, then the training or evaluation transform (docs/method.md §3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data.decode import Pair, Record
from tmtseg.data.sources import list_source
from tmtseg.data.transforms import eval_transform, train_transform
from tmtseg.errors import ConfigError


class SegDataset(Dataset):
    """Items: ``image`` uint8 [3, H, W], ``label`` int64 [H, W] (class ids or ``ignore_index``), ``name``.

    Training items are random crops; evaluation items resize the image by ``scale`` and keep the full-size label.
    """

    def __init__(
        self,
        *,
        records: list[Record],
        decoder: Callable[[Record], Pair],
        class_names: list[str],
        palette: np.ndarray,
        ignore_index: int = 255,
        train: bool,
        scale: float = 1.0,
        crop_size: Sequence[int] = (128, 128),
        scale_range: Sequence[float] = (0.75, 1.5),
        hflip: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        self.records = records
        self.decoder = decoder
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.palette = palette
        self.ignore_index = ignore_index
        self.train = train
        self.scale = scale
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded pair at full resolution: uint8 [3, H, W], int64 [H, W]."""
        rgb, label = self.decoder(self.records[index])
        image = torch.from_numpy(np.require(rgb, np.uint8, ["C", "W"])).permute(2, 0, 1).contiguous()  # [3, H, W]
        return image, torch.from_numpy(np.require(label, np.int64, ["C", "W"]))

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        if self.train:
            image, label = train_transform(
                image,
                label,
                scale=self.scale,
                scale_range=self.scale_range,
                crop_size=self.crop_size,
                hflip=self.hflip,
                jitter=self.color_jitter,
                ignore_index=self.ignore_index,
            )
        else:
            image, label = eval_transform(image, label, scale=self.scale)
        return {"image": image, "label": label, "name": self.records[index].name}


def build_dataset(split: SplitConfig, data: DataConfig, *, train: bool, key: str = "split") -> SegDataset:
    """The dataset of one split; ``key`` (e.g. ``data.train``) names the split in error messages."""
    source = list_source(split, data, key=key)
    if not source.records:
        raise ConfigError(f"config key {key}: selects no images from {source.where}")
    return SegDataset(
        records=source.records,
        decoder=source.decoder,
        class_names=source.class_names,
        palette=source.palette,
        ignore_index=data.ignore_index,
        train=train,
        scale=split.scale or data.scale,
        crop_size=data.crop_size,
        scale_range=data.scale_range,
        hflip=data.hflip,
        color_jitter=data.color_jitter,
    )


def collate(batch: list[dict]) -> dict:
    """Stack images [B, 3, H, W] and labels [B, H, W]; evaluation items of different sizes stay lists."""
    images, labels = [b["image"] for b in batch], [b["label"] for b in batch]
    same = all(i.shape == images[0].shape for i in images) and all(lb.shape == labels[0].shape for lb in labels)
    return {
        "image": torch.stack(images) if same else images,  # [B, 3, H, W]
        "label": torch.stack(labels) if same else labels,  # [B, H, W]
        "name": [b["name"] for b in batch],
    }
