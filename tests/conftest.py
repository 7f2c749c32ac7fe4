"""Shared fixtures: the real data folder (skip only if absent) and a tiny generated Cityscapes layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data beside the repository (research-only: read in place, never copied)."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}")
    return path


# raw Cityscapes label ids painted in the fixture, one per 4x4 block: classes, void ids and 255
CITYSCAPES_IDS = np.array([[0, 7, 8, 11], [26, 33, 24, 255], [1, 23, 21, 3]], dtype=np.uint8)
CITYSCAPES_FILES = [("train", "aachen", 19), ("train", "aachen", 20), ("train", "bremen", 5), ("val", "lindau", 1)]


@pytest.fixture
def tiny_cityscapes(tmp_path: Path) -> Path:
    """A Cityscapes-layout folder: train (two cities, 2 + 1 images) and val (1 image), 12x16 pixels."""
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    labels = np.kron(CITYSCAPES_IDS, np.ones((4, 4), dtype=np.uint8))  # [12, 16]
    for split, city, frame in CITYSCAPES_FILES:
        stem = f"{city}_000000_{frame:06d}"
        img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(labels).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        # the colour rendering Cityscapes ships beside the ids must not be mistaken for a label
        Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(gt_dir / f"{stem}_gtFine_color.png")
    return root
