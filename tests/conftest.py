"""Shared fixtures: the real data folder (skip only if absent) and a tiny generated Cityscapes layout; and how the
suite shares 2 cores between pytest-xdist's workers (pyproject's addopts: `-n auto --dist loadfile`, a module's tests
on one worker, so that a module-scoped fixture, a checkpoint trained once or an export made once, is built once)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Modules of half a minute or more (exports, trainings, benches, DDP, compiles), slowest first as measured: handed out
# first, so that the last minutes of a parallel run are not one worker finishing a long module while the other waits.
HEAVY_FIRST = ("test_export.py", "test_smoke.py", "test_failures.py", "test_ddp.py", "test_compile.py", "test_bench.py",
               "test_inputs.py", "test_sigterm.py", "test_faults.py", "test_resume.py", "test_cli.py",
               "test_adversarial.py", "test_bench_launch.py", "test_bench_advise.py", "test_diagnose.py",
               "test_api.py", "test_driving.py", "test_bench_budget.py")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, one torch thread per worker (and per process a test starts): the workers share the cores, and
    two threads each would only wait for each other. Then the fork server of the commands the tests run."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        import torch

        torch.set_num_threads(1)
    controller = not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None)
    if not controller:  # a worker, or a run without xdist (-n 0): xdist's controller runs no test
        from tests import forkcli

        forkcli.start_server()  # under these settings, and before any test: tests/forkcli.py's start_server says why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavy modules first; every worker sorts the same collection the same way, as xdist requires."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept


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
