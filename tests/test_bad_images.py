"""Bad or unusual image files met by training (issue 29 §1), through `tmtseg train` on a generated folder: each is
either read as documented (grayscale -> 3 equal channels, RGBA -> alpha dropped, 16-bit -> 0-65535 scaled to 0-255, as
predict reads them) or refused with exit 2 and one line naming the file before any training step runs (no log line,
no checkpoint): a truncated or empty (0-byte) image or label, a label of another size than its image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tmtseg.config import load_config
from tmtseg.data.sources import list_source

from .test_adversarial import QUICK, folder_args, inproc, make_folder, one_error
from .test_resume import cli


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


REFUSED = {  # what is done to im1's image or mask -> the file named, and the words of the one line
    "truncated image": (lambda d: _truncate(d / "images" / "im1.png"), "images/im1.png", "truncated image"),
    "empty image": (lambda d: (d / "images" / "im1.png").write_bytes(b""), "images/im1.png", "empty image file"),
    "truncated label": (lambda d: _truncate(d / "masks" / "im1.png"), "masks/im1.png", "truncated label"),
    "empty label": (lambda d: (d / "masks" / "im1.png").write_bytes(b""), "masks/im1.png", "empty label file"),
    "label of another size": (
        lambda d: Image.fromarray(np.zeros((40, 64), dtype=np.uint8)).save(d / "masks" / "im1.png"),
        "masks/im1.png",
        "label size 64x40 differs from image size 64x48",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_file_is_refused_by_train_naming_it_before_any_step(tmp_path, case):
    data = make_folder(tmp_path / "data")
    spoil, named, words = REFUSED[case]
    spoil(data)
    run_dir = tmp_path / "run"
    line = one_error(inproc("train", *QUICK, *folder_args(data), f"output_dir={run_dir}"), 2, data / named, words)
    assert "BufferedReader" not in line  # not PIL's own wording for an empty file
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()  # no step ran


def test_grayscale_rgba_and_16_bit_images_are_read_as_documented_and_train(tmp_path):
    data = make_folder(tmp_path / "data")
    rgb = {i: np.asarray(Image.open(data / "images" / f"im{i}.png")) for i in range(3)}  # [H, W, 3] uint8
    grey = rgb[0][..., 0]  # [H, W]
    Image.fromarray(grey).save(data / "images" / "im0.png")  # mode L
    alpha = np.full((*rgb[1].shape[:2], 1), 7, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb[1], alpha], 2)).save(data / "images" / "im1.png")  # mode RGBA
    wide = (rgb[2][..., 1].astype(np.uint16) * 257 + 100).astype(np.uint16)  # 16 bits, not a multiple of 257
    Image.fromarray(wide).save(data / "images" / "im2.png")  # mode I;16
    cfg = load_config([], [*QUICK, *folder_args(data)])
    source = list_source(cfg.data.train, cfg.data, key="data.train")
    decoded = {r.name: source.decoder(r)[0] for r in source.records}  # name -> [H, W, 3] uint8
    assert np.array_equal(decoded["im0"], np.repeat(grey[..., None], 3, 2))  # grayscale -> 3 equal channels
    assert np.array_equal(decoded["im1"], rgb[1])  # RGBA -> the alpha dropped
    expected = np.round(wide.astype(np.float64) / 257).astype(np.uint8)  # 0-65535 -> 0-255, as predict reads it
    assert np.array_equal(decoded["im2"], np.repeat(expected[..., None], 3, 2))
    run_dir = tmp_path / "run"
    result = cli("train", *QUICK, *folder_args(data), f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()
