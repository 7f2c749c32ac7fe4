"""Bounded memory over a folder (issue 29 §3): while predict goes through a folder, what it holds does not grow with
the images done (no list of results, lines or written paths kept per image). Measured with tracemalloc (Python and
numpy allocations) on predict's own loop with a stand-in model, so that only predict's bookkeeping is seen;
benchmarks/memory_bounded.py measures the peak RSS of `tmtseg predict` and `tmtseg eval` up to 10 000 images."""

from __future__ import annotations

import gc
import pathlib
import tracemalloc
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from tmtseg.tools.predict import Outputs, default_palette, write_predictions

IMAGES, SETTLED = 300, 50  # the growth is measured from image SETTLED (first-call caches filled) to the last
# the old loop kept each image's JSON line and written paths: about 0.4 KiB more per image done; now nothing
MAX_BYTES_PER_IMAGE = 40


def _scores(x: torch.Tensor) -> torch.Tensor:
    """A stand-in segmenter: uint8 [B, 3, h, w] -> scores [B, 2, h, w] (class 1 where the red channel is bright)."""
    bright = (x[:, :1].float() > 127).float()
    return torch.cat([1 - bright, bright], 1)


def test_predict_holds_nothing_more_per_image_done(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"im{i:04d}.png")
    held: list[tracemalloc.Snapshot] = []

    def progress(files):
        for i, path in enumerate(files):
            if i == SETTLED:  # traced from here on: what is allocated later and still held at the last image
                tracemalloc.start()
            if i in (SETTLED, IMAGES - 1):
                gc.collect()
                held.append(tracemalloc.take_snapshot())
            yield path

    outputs = Outputs(default_palette(2), ["dark", "bright"], ("palette",), jsonl=True)
    try:
        count = write_predictions(_scores, outputs, folder, tmp_path / "out", scale=1.0, mode="whole", crop=(8, 8),
                                  stride=(8, 8), progress=progress)  # fmt: skip
    finally:
        tracemalloc.stop()
    count = count if isinstance(count, int) else len(count)  # the old loop returned every path written
    assert count == 2 * IMAGES + 1  # an id PNG and an overlay per image, and predictions.jsonl
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == IMAGES
    # left out: pathlib's lazy caches (a path computes its string and hash when first used; the names are kept) and
    # PIL's (its decoders' small objects come and go with the allocator's timing, not per image)
    skip = [tracemalloc.Filter(False, pathlib.__file__), tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, str(Path(PIL.__file__).parent / "*"))]  # fmt: skip
    diff = held[1].filter_traces(skip).compare_to(held[0].filter_traces(skip), "lineno")
    per_image = sum(d.size_diff for d in diff) / (IMAGES - 1 - SETTLED)
    assert per_image < MAX_BYTES_PER_IMAGE, f"{per_image:.0f} bytes more held per image: {[str(d) for d in diff[:4]]}"


def test_advise_regions_hold_a_few_bytes_per_region_and_choose_as_before():
    """advise --regions keeps every region's image, id, pixel count and score until the choice (the choice ranks all of
    them): 20 bytes a region in numpy columns; the Python lists before held about 100 (64 token cells per 64x64
    image: 9.9 KiB more peak RSS per image in benchmarks/memory_bounded.py)."""
    from tmtseg.tools.advise_select import RegionTable, choose_regions, grid_regions

    ids, rng, images = grid_regions((64, 64), 8), np.random.default_rng(0), 500  # 64 regions an image
    maps = [rng.random((64, 64)) for _ in range(4)]
    table = RegionTable()
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(images):
            table.add(i, ids, maps[i % 4])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(table) == 64 * images and held / len(table) < 2 * 20 + 1, f"{held / len(table):.0f} bytes a region"
    # the choice is the one of the lists: the highest means first (ties to the earlier region), 1 % of the pixels
    chosen = choose_regions(table, 1.0)  # 320 of the 32 000 regions of 64 pixels
    means = [np.bincount(ids.reshape(-1), weights=m.reshape(-1)) / 64 for m in maps]
    expected: dict[int, set[int]] = {}
    for j in sorted(range(len(table)), key=lambda j: (-means[(j // 64) % 4][j % 64], j))[:320]:
        expected.setdefault(j // 64, set()).add(j % 64)
    assert chosen == expected
    assert all(type(i) is int and all(type(r) is int for r in rs) for i, rs in chosen.items())  # JSON-ready
