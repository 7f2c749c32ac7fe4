"""Adversarial inputs (issue 13), through the real command: no hang, no overwritten work, no silent wrong result, and
every bad input one line `tmtseg: error: ...` naming the file or key, with its documented exit code. Every fixture is
generated here."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tmtseg.checkpoint import MODEL_FILE, list_checkpoints

from .test_resume import REPO, cli, env, logged_step, start, wait_for
from .tiny import TINY

FOLDER = ["data.train.kind=folder", "data.val.kind=folder", "data.num_classes=2"]
QUICK = [*TINY, "train.iters=2", "train.warmup_iters=1", "train.log_every=1", "train.save_every=2"]


def one_error(result, code: int, *named: object) -> str:
    """The run failed with `code` and exactly one stderr line, `tmtseg: error: ...`, naming each of `named`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmtseg: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for thing in named:
        assert str(thing) in lines[0], (thing, lines[0])
    return lines[0]


def make_folder(root: Path, *, n: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """A two-class folder dataset: images/, masks/ (0 = background, 1 = a bright square) and dataset.yaml."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text("classes: [background, square]\n")
    h, w = size
    for i in range(n):
        label = np.zeros((h, w), dtype=np.uint8)
        label[h // 4 : h // 2 + 2, w // 4 : w // 2 + 2] = 1
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        image[label == 1] += 150
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "masks" / f"im{i}.png")
    return root


def folder_args(path: Path) -> list[str]:
    return [*FOLDER, f"data.train.path={path}", f"data.val.path={path}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished two-step run on a generated folder: its final checkpoint folder."""
    root = tmp_path_factory.mktemp("trained")
    data = make_folder(root / "data")
    result = cli("train", *QUICK, *folder_args(data), f"output_dir={root / 'run'}")
    assert result.returncode == 0, result.stderr
    return root / "run" / "checkpoints" / "iter_0000002"


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {
        p: p.read_bytes()
        for root in paths
        for p in ([root] if root.is_file() else sorted(root.rglob("*")))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------------ 1. no hang
def test_an_image_that_turns_unreadable_mid_run_with_workers_exits_2_promptly(tmp_path):
    """Loader workers ignore SIGTERM; an error with them alive must still end the process (it used to hang at exit,
    waiting for them). Without the fix this test times out."""
    data = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = start(
        "train",
        *TINY,
        *folder_args(data),
        "data.num_workers=2",
        "train.iters=500",
        "train.log_every=1",
        "train.save_every=1000",
        f"output_dir={run}",
    )
    wait_for(lambda: logged_step(run) >= 1, proc)
    bad = data / "images" / "im1.png"
    bad.write_text("garbage\n")
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("the run hung after the data error")
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmtseg: error: {bad}: unreadable"), err
