"""predict --out never lands in its input folder (issue 29): the folder itself or any folder inside it is refused
with exit 2 and one line naming both, before anything is written (the next run over the folder would read the
predictions as inputs); a folder beside it is fine."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .test_adversarial import checkpoint, inproc, one_error, snapshot  # noqa: F401 (checkpoint: a fixture)


def test_predict_out_equal_to_or_inside_the_input_folder_is_refused(checkpoint, tmp_path):  # noqa: F811
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    (tmp_path / "link").symlink_to(folder)  # the same folder under another name
    before = snapshot(folder)
    for out in (folder, folder / "preds", folder / "deep" / "er", tmp_path / "link" / "preds", folder / "x" / ".."):
        result = inproc("predict", str(checkpoint), str(folder), "--out", str(out))
        one_error(result, 2, f"--out {out}: inside the input folder {folder}")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["a.png"]
    beside = inproc("predict", str(checkpoint), str(folder), "--out", str(tmp_path / "preds"))
    assert beside.returncode == 0, beside.stderr
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["a.png", "a_overlay.png"]
