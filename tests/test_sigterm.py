"""SIGTERM outside training (issue 29 §2; training's own stops are in test_faults.py and test_failures.py): `tmtseg
eval` and `tmtseg predict` stop cleanly with exit 143 and one line, leave no partial output (eval.json as it was, every
PNG written whole), and the same command run again gives what an uninterrupted one gives."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from .test_faults import sigterm_line
from .test_resume import cli, start, wait_for
from .tiny import TINY

VAL_IMAGES = 120  # enough synthetic scenes that the scoring still runs when the signal comes (about 20 ms each)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for one step: what is scored and predicted with."""
    run_dir = tmp_path_factory.mktemp("run")
    result = cli("train", *TINY, "data.train.num_images=2", "data.val.num_images=2", "train.iters=1",
                 "train.warmup_iters=0", f"output_dir={run_dir}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoints" / "iter_0000001"


def test_sigterm_during_eval_stops_in_one_line_writes_nothing_and_the_next_eval_is_the_clean_one(checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    args = ("eval", str(checkpoint), f"data.val.num_images={VAL_IMAGES}", "--out", str(out))
    clean = cli(*args)
    assert clean.returncode == 0, clean.stderr
    before = out.read_bytes()
    proc = start(*args)
    # the data table is printed once the model is loaded and the labels checked: the scoring comes next
    assert proc.stdout.readline().startswith("class shares"), "eval ended before its data table"
    line = sigterm_line(proc, what="the evaluation")
    stopped = re.fullmatch(rf"tmtseg: error: SIGTERM during evaluation of {re.escape(str(checkpoint))}: stopped after"
                           rf" (\d+)/{VAL_IMAGES} images; nothing written; run it again", line)  # fmt: skip
    assert stopped and int(stopped[1]) < VAL_IMAGES, line
    assert out.read_bytes() == before  # not a partial score, not a half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary file left beside it
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == before and json.loads(before)["mIoU"] >= 0.0


def test_sigterm_during_predict_stops_in_one_line_and_leaves_only_whole_files(checkpoint, tmp_path):
    folder, out, n = tmp_path / "images", tmp_path / "out", 150
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    proc = start("predict", str(checkpoint), str(folder), "--out", str(out), "--jsonl")
    wait_for(lambda: len(list(out.glob("*_overlay.png"))) >= 2, proc)
    line = sigterm_line(proc, what="predict")
    stopped = re.fullmatch(rf"tmtseg: error: SIGTERM during prediction: stopped after (\d+)/{n} images \(their files"
                           r" are whole\); run the same command again", line)  # fmt: skip
    assert stopped and 2 <= int(stopped[1]) < n, line
    done = int(stopped[1])
    overlays = sorted(out.glob("*_overlay.png"))
    ids = sorted(p for p in out.glob("*.png") if p not in overlays)
    assert len(ids) == len(overlays) == done
    for path in [*ids, *overlays]:
        with Image.open(path) as im:
            im.load()  # a cut PNG fails to decode
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == [p.stem for p in ids]  # a whole line for each image done, in order
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
