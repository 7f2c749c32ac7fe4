"""Manifests stay inside their root (issue 29): a row whose image, label or mask resolves outside the manifest's
folder (`..`, an absolute path, a symlink leading out) is refused by `train` with exit 2 and one line naming the
manifest and the row, before anything is built or any step runs; paths (and symlinks) that stay inside are fine."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

from tmtseg.cli import main
from tmtseg.data.sources import read_manifest
from tmtseg.errors import DataError

from .tiny import TINY

HEADER = "image,label,domain,sequence,segnet_split,suggested_role"


def _fake_camvid(tmp_path):
    """data.root/camvid-daydusk with two good day rows, and one PNG outside it that bad rows point at."""
    folder = tmp_path / "root" / "camvid-daydusk"
    (folder / "day").mkdir(parents=True)
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "day" / f"{stem}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "day" / f"{stem}_l.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (folder / "day" / "link_out.png").symlink_to(outside)
    (folder / "day" / "link_in.png").symlink_to(folder / "day" / "a.png")
    (folder / "day" / "out").symlink_to(tmp_path, target_is_directory=True)  # a folder leading out
    return folder, outside


def _write(folder, *rows: str):
    (folder / "manifest.csv").write_text(
        "\n".join([HEADER, "day/a.png,day/a_l.png,day,s,train,source_train", *rows]) + "\n"
    )


def _train(tmp_path, run_dir):
    split = "kind=manifest,dataset=camvid-daydusk,domain=day"
    args = [*TINY, f"data.root={tmp_path / 'root'}", "data.num_classes=11", f"output_dir={run_dir}", "train.iters=1"]
    args += [f"data.{k}.{kv}" for k in ("train", "val") for kv in split.split(",")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--no-progress", "train", *args])
    return code, err.getvalue().strip().splitlines()


@pytest.mark.parametrize(
    "column,value",
    [
        ("image", "../../secret.png"),
        ("label", "../../secret.png"),
        ("image", "ABS"),
        ("label", "day/link_out.png"),
        ("image", "day/out/secret.png"),
    ],
)
def test_a_manifest_row_leading_outside_its_folder_is_refused_before_any_step(tmp_path, column, value):
    folder, outside = _fake_camvid(tmp_path)
    value = str(outside) if value == "ABS" else value
    image, label = (value, "day/b_l.png") if column == "image" else ("day/b.png", value)
    _write(folder, f"{image},{label},day,s,train,source_train")
    run_dir = tmp_path / "run"
    code, lines = _train(tmp_path, run_dir)
    manifest = folder / "manifest.csv"
    assert code == 2 and lines == [
        f"tmtseg: error: {manifest}: line 3: {column} {value} leads outside the manifest's folder {folder}"
    ]
    assert not list(run_dir.rglob("*.safetensors")) and not (run_dir / "metrics.jsonl").exists()
    with pytest.raises(DataError, match="line 3"):
        read_manifest(manifest)


def test_manifest_paths_and_symlinks_that_stay_inside_are_read(tmp_path):
    folder, _ = _fake_camvid(tmp_path)
    _write(folder, "day/../day/b.png,day/b_l.png,day,s,train,source_train", "day/link_in.png,,day,s,train,x")
    assert [r["image"] for r in read_manifest(folder / "manifest.csv")][1:] == ["day/../day/b.png", "day/link_in.png"]
