"""SIGTERM outside training (issue 29 §2; training's own stops are in test_faults.py and test_failures.py): `tmtseg
eval`, `tmtseg predict` and `tmtseg bench` stop cleanly with exit 143 and one line, leave no partial output (eval.json
as it was, every PNG written whole, no bench record of an unfinished run), and the same command run again gives what
an uninterrupted one gives (the bench's interrupted run resumed from its checkpoint)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from tmtseg.io.checkpoint import list_checkpoints
from tmtseg.tools.bench import load_bench, plan

from .test_bench import _bench_file
from .test_faults import sigterm_line
from .test_resume import cli, logged_step, start, wait_for
from .tiny import TINY

VAL_IMAGES = 120  # enough synthetic scenes that the scoring still runs when the signal comes (about 20 ms each)
# the bench test starts 10 processes (3 benches, 7 runs): about a minute of CPU; bounds for a loaded machine
LOADED = 900


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


def test_sigterm_to_a_bench_stops_its_runs_with_a_checkpoint_and_the_same_command_ends_as_if_never_stopped(tmp_path):
    """The tiny bench of test_bench.py with two methods (the source scored on the target, and fine-tuned on it):
    SIGTERM to the bench's process group mid-way through the source's training; then the same command, whose results
    equal an uninterrupted bench's, bitwise."""
    longer = ["profiles.quick.source=[train.iters=8]"]  # the source's 8 steps: time to be stopped in the middle
    for name in ("reference", "stopped"):
        (tmp_path / name).mkdir()
    reference = _bench_file(tmp_path / "reference", methods=["source-only", "finetune"])
    assert cli("bench", str(reference), *longer, timeout=LOADED).returncode == 0
    spec = _bench_file(tmp_path / "stopped", methods=["source-only", "finetune"])
    source = plan(*load_bench(str(spec), longer)).runs[0]
    assert source.method == "source"
    proc = start("bench", str(spec), *longer)
    wait_for(lambda: logged_step(source.out) >= 2, proc, timeout=LOADED)
    line = sigterm_line(proc, what="the bench", timeout=LOADED)
    assert line == (
        "tmtseg: error: SIGTERM: stopped with 0 of 3 runs finished, 1 interrupted (checkpoint saved); continue with"
        " the same command"
    )
    results = tmp_path / "stopped" / "out" / "results.jsonl"
    assert not results.exists() or results.read_text() == ""  # nothing recorded for a run that did not finish
    assert list_checkpoints(source.out) and logged_step(source.out) < 8  # stopped mid-way, with a checkpoint
    again = cli("bench", str(spec), *longer, timeout=LOADED)
    assert again.returncode == 0, again.stderr
    scores = lambda path: {r["method"]: r["metrics"] for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    assert scores(results) == scores(tmp_path / "reference" / "out" / "results.jsonl")  # equal floats: bitwise
