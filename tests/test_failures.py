"""Checkpoints that cannot be lost and runs that fail cleanly (issue 6 §3): kills inside slowed saves, a truncated
newest checkpoint, SIGTERM (finish the step, save, exit 143), non-finite losses (stop or skip, never saved)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tmtseg.errors import TrainingError
from tmtseg.io.checkpoint import (
    MODEL_FILE,
    SLOW_SAVE_ENV,
    STATE_FILE,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

from .test_resume import (
    ITERS,
    RUN,
    assert_same_outcome,
    cli,
    kill9,
    logged_step,
    outcome,
    start,
    train,
    uninterrupted,
    uninterrupted_dir,
    wait_for,
)


def _all_loadable(run_dir) -> list[str]:
    """Every listed checkpoint loads whole (weights and training state): none is ever half-written."""
    names = []
    for ckpt in list_checkpoints(run_dir):
        load_checkpoint(ckpt)
        load_file(str(ckpt / STATE_FILE))
        names.append(ckpt.name)
    return names


def _every_saved_tensor_finite(run_dir) -> bool:
    files = list((run_dir / "checkpoints").rglob("*.safetensors"))
    assert files
    tensors = [t for f in files for t in load_file(str(f)).values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_repeated_kills_inside_slowed_saves_never_lose_a_checkpoint(tmp_path_factory, tmp_path):
    reference = uninterrupted(tmp_path_factory)
    run_dir, slow = tmp_path / "run", 0.4
    rng = random.Random(61)
    newest = ""
    for attempt in range(3):
        resume = ["--resume"] if attempt else []
        proc = start(
            "train", *RUN, f"output_dir={run_dir}", "train.save_every=1", *resume, env_extra={SLOW_SAVE_ENV: str(slow)}
        )
        # kill inside the save of a random later step (not the first save of a fresh run: something must exist)
        target = logged_step(run_dir) + rng.randint(2 if attempt == 0 else 1, 3)

        def saving(pid=proc.pid, target=target) -> bool:
            tmp = [p.name for p in (run_dir / "checkpoints").glob(f".tmp_iter_*_{pid}")]
            return any(int(name.split("_")[2]) >= target for name in tmp)

        wait_for(saving, proc)
        time.sleep(rng.uniform(0.0, slow))  # writing the files, before the rename, or after it (before pruning)
        kill9(proc)
        names = _all_loadable(run_dir)
        assert names and names[-1] >= newest, f"kill {attempt}: {names} after {newest}"  # the previous one survives
        assert latest_valid(run_dir).name == names[-1]
        newest = names[-1]
    assert logged_step(run_dir) < ITERS
    train(run_dir, "train.save_every=1", resume=True)
    assert_same_outcome(reference, outcome(run_dir))


def test_truncated_newest_checkpoint_is_skipped_with_a_warning_and_resume_takes_the_previous(
    tmp_path_factory, tmp_path
):
    reference, run_dir = uninterrupted(tmp_path_factory), tmp_path / "run"
    shutil.copytree(uninterrupted_dir(tmp_path_factory), run_dir, symlinks=True)
    newest = run_dir / "checkpoints" / f"iter_{ITERS:07d}"
    data = (newest / MODEL_FILE).read_bytes()
    (newest / MODEL_FILE).write_bytes(data[: len(data) // 2])  # as by a full disk or a copy cut short
    result = train(run_dir, resume=True)
    warnings = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and warnings[0].startswith(f"tmtseg: warning: {newest}: skipped, unreadable")
    assert_same_outcome(reference, outcome(run_dir))  # redone from the previous checkpoint: the same run again


def test_sigterm_finishes_the_step_saves_and_exits_143_then_resumes_exactly(tmp_path_factory, tmp_path):
    reference = uninterrupted(tmp_path_factory)
    run_dir = tmp_path / "run"
    stop_at = random.Random(15).randint(2, ITERS - 4)
    proc = start("train", *RUN, f"output_dir={run_dir}", "data.num_workers=2")
    wait_for(lambda: logged_step(run_dir) >= stop_at, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, data-loader workers included, as a scheduler does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    step = logged_step(run_dir)
    saved = run_dir / "checkpoints" / f"iter_{step:07d}"
    assert lines == [f"tmtseg: error: SIGTERM at step {step}: saved {saved}; continue with --resume"]
    assert step < ITERS and latest_valid(run_dir) == saved
    train(run_dir, "data.num_workers=2", resume=True)
    assert_same_outcome(reference, outcome(run_dir))


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # lr 1e30: the first update is finite but enormous, the second step's loss is NaN
    result = cli("train", *RUN, f"output_dir={run_dir}", "train.lr=1e30", "train.save_every=1")
    assert result.returncode == 4
    last_good = run_dir / "checkpoints" / "iter_0000001"
    assert result.stderr.strip().splitlines() == [
        f"tmtseg: error: non-finite loss or gradient at step 2 (loss nan, grad norm not computed); the step was not"
        f" applied and nothing was saved; last good checkpoint: {last_good} (train.nonfinite=skip skips such steps)"
    ]
    assert [p.name for p in list_checkpoints(run_dir)] == ["iter_0000001"]
    assert _every_saved_tensor_finite(run_dir)
    again = cli("train", *RUN, f"output_dir={run_dir}")  # and a fresh run never mixes with an earlier one's files
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"tmtseg: error: {run_dir / 'checkpoints'}: holds checkpoints of an earlier run; pass --resume to continue it"
        " or set another output_dir"
    ]


def test_non_finite_steps_are_skipped_on_request_and_never_saved(tmp_path):
    run_dir = tmp_path / "run"
    # 3 of 4 steps skipped: above the default train.max_skipped_frac, which test_skipped_steps.py checks
    train(run_dir, "train.lr=1e30", "train.nonfinite=skip", "train.iters=4", "train.save_every=2",
          "train.max_skipped_frac=1")  # fmt: skip
    log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "skipped" in r] == [2, 3, 4]
    assert [p.name for p in list_checkpoints(run_dir)] == ["iter_0000002", "iter_0000004"]
    assert _every_saved_tensor_finite(run_dir)


def test_best_is_switched_atomically_and_leftovers_of_killed_saves_are_cleared(tmp_path):
    model = nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, step=1, model=model, meta={}, name="best")
    assert os.readlink(root / "best") == "best_iter_0000001"
    # what saves killed mid-way leave: a new best folder not yet linked, a temporary folder, a temporary link
    (root / "best_iter_0000002").mkdir()
    (root / ".tmp_iter_0000003_999").mkdir()
    os.symlink("best_iter_0000002", root / ".tmp_link_best_999")
    assert load_checkpoint(root / "best").meta["step"] == 1  # the link still names the complete previous best
    with torch.no_grad():
        model.weight.fill_(2.0)
    save_checkpoint(tmp_path, step=3, model=model, meta={}, name="best")
    assert sorted(p.name for p in root.iterdir()) == ["best", "best_iter_0000003"]
    assert torch.equal(load_checkpoint(root / "best").weights["weight"], model.weight)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="weight holds NaN or inf"):
        save_checkpoint(tmp_path, step=4, model=model, meta={}, name="best")
    assert sorted(p.name for p in root.iterdir()) == ["best", "best_iter_0000003"]
