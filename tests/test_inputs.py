"""Input content hashes (issue 29): a run records the sha256 of each input it depends on (source checkpoint, data
splits) in every checkpoint; `--resume` and `tmtseg eval` refuse a changed input with exit 2 and one line naming the
file and both hashes, and `--allow-changed-inputs` goes on, recording the change in the run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config, to_dict
from tmtseg.hashing import sha256, sha256_cached
from tmtseg.io.checkpoint import MODEL_FILE, list_checkpoints, read_meta, save_model_file

from .test_resume import RUN, cli, kill9, start, wait_for

SMALL = [*RUN, "model.backbone.depth=1", "data.train.num_images=4", "data.val.num_images=1"]


def _source(folder: Path, seed: int) -> Path:
    """A tiny source model (random weights, seed `seed`) saved as a checkpoint folder."""
    cfg = load_config([], SMALL)
    torch.manual_seed(seed)
    save_model_file(folder, model=build_model_with_loss(cfg, pretrained=False), meta={"config": to_dict(cfg)})
    return folder


def _one_line(result, code: int) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code and len(lines) == 1, result.stderr
    return lines[0]


def test_resume_refuses_a_changed_source_checkpoint_unless_allowed_and_then_records_it(tmp_path):
    src = _source(tmp_path / "src", seed=0)
    other = _source(tmp_path / "other", seed=1)
    was, now = sha256(src / MODEL_FILE), sha256(other / MODEL_FILE)
    run_dir = tmp_path / "run"
    # lwf: the frozen teacher (the source model) and the KL term
    args = ["adapt", *SMALL, "train.iters=40", "train.save_every=1", "--method", "lwf",
            "--source-checkpoint", str(src), f"output_dir={run_dir}"]  # fmt: skip
    proc = start(*args)
    wait_for(lambda: len(list_checkpoints(run_dir)) >= 1, proc)
    kill9(proc)  # interrupted after its first checkpoint
    ckpt = list_checkpoints(run_dir)[-1]
    assert read_meta(ckpt / MODEL_FILE)["inputs"]["adapt.source_checkpoint"]["sha256"] == was
    step = read_meta(ckpt / MODEL_FILE)["step"]
    shutil.copyfile(other / MODEL_FILE, src / MODEL_FILE)  # another source model under the same name
    log = (run_dir / "metrics.jsonl").read_text()

    extend = f"train.iters={step + 2}"  # a short continuation, whatever step the kill came at
    line = _one_line(cli(*args, extend, "--resume"), 2)
    assert str(src / MODEL_FILE) in line and "adapt.source_checkpoint" in line
    assert was[:12] in line and now[:12] in line and "--allow-changed-inputs" in line
    assert list_checkpoints(run_dir)[-1] == ckpt and (run_dir / "metrics.jsonl").read_text() == log  # untouched

    result = cli(*args, extend, "--resume", "--allow-changed-inputs")
    assert result.returncode == 0, result.stderr
    assert any("adapt.source_checkpoint changed" in ln and ln.startswith("tmtseg: warning: ")
               for ln in result.stderr.splitlines())  # fmt: skip
    meta = read_meta(list_checkpoints(run_dir)[-1] / MODEL_FILE)
    assert meta["step"] == step + 2 and meta["inputs"]["adapt.source_checkpoint"]["sha256"] == now
    assert [(c["input"], c["was"], c["now"], c["step"]) for c in meta["changed_inputs"]] == [
        ("adapt.source_checkpoint", was, now, step)
    ]
    # the allowed change is now part of the run: a later resume compares with the new hash, and passes
    assert cli(*args, f"train.iters={step + 3}", "--resume").returncode == 0


def _folder(root: Path, stems: list[str]) -> Path:
    """A 5-class folder dataset (images/, masks/, dataset.yaml) of 40x48 images."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c", "d", "e"]}))
    rng = np.random.default_rng(0)
    for stem in stems:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray((np.arange(40 * 48).reshape(40, 48) % 5).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


def test_eval_refuses_a_run_whose_val_split_file_list_changed_unless_allowed(tmp_path):
    val = _folder(tmp_path / "val", ["x", "y"])
    run_dir = tmp_path / "run"
    train = ["train", *SMALL, "train.iters=1", "data.val.kind=folder", f"data.val.path={val}", f"output_dir={run_dir}"]
    assert cli(*train).returncode == 0
    best = run_dir / "checkpoints" / "best"
    recorded = read_meta(best / MODEL_FILE)["inputs"]["data.val"]
    assert cli("eval", str(best), "--out", str(tmp_path / "a.json")).returncode == 0  # unchanged: scored

    _folder(val, ["z"])  # one more image and mask
    line = _one_line(cli("eval", str(best), "--out", str(tmp_path / "b.json")), 2)
    assert "data.val" in line and str(val) in line and recorded["sha256"][:12] in line
    assert "--allow-changed-inputs" in line and not (tmp_path / "b.json").exists()

    result = cli("eval", str(best), "--out", str(tmp_path / "c.json"), "--allow-changed-inputs")
    assert result.returncode == 0, result.stderr
    changes = json.loads((tmp_path / "c.json").read_text())["changed_inputs"]
    assert [(c["input"], c["was"]) for c in changes] == [("data.val", recorded["sha256"])]
    # another split given on the command line is not the recorded one: nothing to compare
    other = _folder(tmp_path / "other", ["q"])
    assert cli("eval", str(best), f"data.val.path={other}", "--out", str(tmp_path / "d.json")).returncode == 0


def test_a_files_hash_is_streamed_and_remembered_until_it_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * (3 << 20))
    assert sha256(f) == sha256_cached(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_bytes(b"b" * (3 << 20))  # rewritten: a new mtime, hashed again
    assert sha256_cached(f) == hashlib.sha256(f.read_bytes()).hexdigest()
