"""Exact resume (issue 6 §2): a run killed with SIGKILL at a random step and resumed ends bitwise equal to the
uninterrupted run (weights, optimizer state, best checkpoint, metrics), with 0 and 2 data-loader workers and random
augmentation on; two identical runs are bitwise equal. The helpers here also serve test_failures, test_cli, test_ddp."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tmtseg.config import load_config
from tmtseg.data import build_dataset, collate
from tmtseg.engine.step import StepSampler, train_batches
from tmtseg.io.checkpoint import MODEL_FILE, STATE_FILE, list_checkpoints, read_meta

from . import forkcli
from .tiny import TINY

REPO = Path(__file__).resolve().parents[1]
ITERS = 12
# augmentation stays on (random rescale, crop, flip, colour jitter: the defaults); an eval and a "best" save at 6 and 12
RUN = [
    *TINY,
    "data.train.num_images=8",
    "data.val.num_images=2",
    f"train.iters={ITERS}",
    "train.warmup_iters=2",
    "train.log_every=1",
    "train.save_every=3",
    "train.eval_every=6",
    "train.keep_last=2",
]
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(**extra: str) -> dict:
    """One thread per process (2 shared cores: more threads only spin) and no launcher variables from outside."""
    e = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return {**e, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def cli(
    *args: str, env_extra: dict | None = None, timeout: float = 180, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python -m tmtseg --no-progress ARGS` to completion, in a process forked from one that imported torch and
    tmtseg once (tests/forkcli.py; fresh=True: a new interpreter, for what a first start prints)."""
    extra = env_extra or {}
    return forkcli.run(["--no-progress", *args], env=env(**extra), cwd=REPO, timeout=timeout, fresh=fresh)


def start(
    *args: str, env_extra: dict | None = None, launcher: tuple[str, ...] = ()
) -> subprocess.Popen | forkcli.Started:
    """Start `python -m tmtseg --no-progress ARGS` in its own process group (so a kill reaches its workers too):
    forked as `cli` does, or, with a launcher (torchrun), under it in a new interpreter."""
    if not launcher and not forkcli.fresh_only():
        return forkcli.Started(["--no-progress", *args], env=env(**(env_extra or {})), cwd=REPO)
    cmd = [*(launcher or (sys.executable,)), "-m", "tmtseg", "--no-progress", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(**(env_extra or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def logged_step(run_dir: Path) -> int:
    """The last training step in the run's metrics log (0 before the first)."""
    log = run_dir / "metrics.jsonl"
    step = 0
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return step


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `condition()` holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited moment:\n{out}\n{err}")
        if time.monotonic() > deadline:
            kill9(proc)
            pytest.fail("timed out waiting for the run")
        time.sleep(0.01)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (the trainer and its data-loader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def train(run_dir: Path, *extra: str, resume: bool = False, env_extra: dict | None = None):
    args = ["train", *RUN, f"output_dir={run_dir}", *extra, *(["--resume"] if resume else [])]
    result = cli(*args, env_extra=env_extra)
    assert result.returncode == 0, result.stderr
    return result


def outcome(run_dir: Path) -> dict:
    """Everything a finished run leaves that must not depend on interruptions (not the timing in the log)."""
    ckpts = run_dir / "checkpoints"
    final = ckpts / f"iter_{ITERS:07d}"
    model_meta = read_meta(final / MODEL_FILE)
    model_meta["config"].pop("output_dir")
    for section, key in (("train", "save_every"), ("data", "num_workers")):  # free to differ: nothing computed changes
        model_meta["config"][section].pop(key)
    log = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("imgs_per_s", None)
        log.append(record)
    return {
        "weights": load_file(str(final / MODEL_FILE)),
        "train_state": load_file(str(final / STATE_FILE)),
        "train_meta": read_meta(final / STATE_FILE),
        "model_meta": model_meta,
        "best": load_file(str(ckpts / "best" / MODEL_FILE)),
        "eval": json.loads((run_dir / "eval.json").read_text()),
        "log": log,
    }


def assert_same_outcome(a: dict, b: dict) -> None:
    for key in ("weights", "train_state", "best"):
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}: {name} differs"
    for key in ("train_meta", "model_meta", "eval", "log"):
        assert a[key] == b[key], key


_REFERENCE: dict = {}


def uninterrupted(factory: pytest.TempPathFactory) -> dict:
    """The outcome of one uninterrupted run of RUN, trained once per test session (`_REFERENCE["dir"]`, read once per
    worker): test_resume, test_failures, test_faults and test_cli compare with it, on either pytest-xdist worker."""
    if "run" not in _REFERENCE:
        folder = _reference_run(factory)
        _REFERENCE.update(run=outcome(folder), dir=folder)
    return _REFERENCE["run"]


def _reference_run(factory: pytest.TempPathFactory) -> Path:
    """Under pytest-xdist, the run folder sits in the session's temporary folder that the workers share (each worker's
    own is inside it): the first worker to need it trains it under a file lock, the others wait for it and read it.
    A run that failed leaves no `done` file, and the next worker trains it again from an empty folder."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = factory.mktemp("reference") / "run"
        train(folder)
        return folder
    from filelock import FileLock  # a dependency of torch

    shared = factory.getbasetemp().parent
    folder, done = shared / "reference", shared / "reference.done"
    with FileLock(str(shared / "reference.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            train(folder)
            done.touch()
    return folder


def uninterrupted_dir(factory: pytest.TempPathFactory) -> Path:
    uninterrupted(factory)
    return _REFERENCE["dir"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return uninterrupted(tmp_path_factory)


def test_sampler_resumes_the_exact_stream():
    whole = StepSampler(10, batch_size=3, seed=4)
    resumed = StepSampler(10, batch_size=3, seed=4, start_step=5)
    expected = [whole.batch(s) for s in range(5, 12)]  # crosses epoch boundaries (10 samples, 3 per step)
    got = [b for b, _ in zip(resumed, range(7), strict=False)]
    assert got == expected
    seen = [i for s in range(10) for i, _ in whole.batch(s)]
    assert sorted(seen[:9]) == sorted(set(seen[:9])) and set(seen[:10]) == set(range(10))  # epoch = permutation


def test_augmented_batches_do_not_depend_on_workers_or_on_where_a_run_starts():
    cfg = load_config([], [*RUN, "data.train.num_images=5"])
    ds = build_dataset(cfg.data.train, cfg.data, train=True)

    def batches(num_workers: int, start_step: int, n: int) -> list[dict]:
        it = train_batches(ds, batch_size=2, seed=3, start_step=start_step, num_workers=num_workers, collate=collate)
        return [next(it) for _ in range(n)]

    torch.manual_seed(0)
    base = batches(0, 0, 4)
    torch.manual_seed(1)  # the global RNG must not matter
    for got in (batches(2, 0, 4), batches(0, 2, 2)):
        for a, b in zip(base[-len(got) :], got, strict=True):
            assert a["name"] == b["name"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # augmentation is on: a scene drawn again in the next epoch (5 scenes, 2 per step) is cropped differently
    flat = [(n, img) for b in base for n, img in zip(b["name"], b["image"], strict=True)]
    again = [(img, other) for i, (n, img) in enumerate(flat) for m, other in flat[i + 1 :] if m == n]
    assert again and all(not torch.equal(a, b) for a, b in again)


def test_two_identical_runs_are_bitwise_equal(tmp_path, reference):
    train(tmp_path / "again")
    assert_same_outcome(reference, outcome(tmp_path / "again"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_kill9_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, reference, num_workers):
    run_dir = tmp_path / "run"
    kill_at = random.Random(600 + num_workers).randint(3, ITERS - 2)  # after the first checkpoint (step 3)
    proc = start("train", *RUN, f"output_dir={run_dir}", f"data.num_workers={num_workers}")
    wait_for(lambda: logged_step(run_dir) >= kill_at, proc)
    kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    assert logged_step(run_dir) < ITERS and list_checkpoints(run_dir)  # really interrupted, with something saved
    train(run_dir, f"data.num_workers={num_workers}", resume=True)
    assert_same_outcome(reference, outcome(run_dir))


def test_kill9_then_resume_equals_the_uninterrupted_run_in_bf16(tmp_path, reference):
    """train.amp=bf16 (issue 12 §1): autocast changes what is computed, not whether a resume continues it exactly."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    train(whole, "train.amp=bf16")
    expected = outcome(whole)
    assert expected["model_meta"]["config"]["train"]["amp"] == "bf16"
    key = "model.decoder.class_embed.weight"
    assert not torch.equal(expected["weights"][key], reference["weights"][key])  # bf16 really computed otherwise
    kill_at = random.Random(612).randint(3, ITERS - 2)
    proc = start("train", *RUN, f"output_dir={run_dir}", "train.amp=bf16")
    wait_for(lambda: logged_step(run_dir) >= kill_at, proc)
    kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    assert logged_step(run_dir) < ITERS and list_checkpoints(run_dir)
    train(run_dir, "train.amp=bf16", resume=True)
    assert_same_outcome(expected, outcome(run_dir))
