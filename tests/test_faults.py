"""Faults in the middle of a run (issue 29 §2): a data-loader worker killed with SIGKILL (as by the kernel's
out-of-memory killer) ends the run promptly with one line (exit 1) naming the step and the checkpoint to resume from,
never a hang, and the run resumes; a disk that fills during a checkpoint write keeps the last good checkpoint whole,
leaves nothing half-written, and the run resumes from it."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tmtseg.io.checkpoint import SLOW_SAVE_ENV, latest_valid, list_checkpoints

from .test_adversarial import inproc, one_error
from .test_resume import (
    ITERS,
    RUN,
    assert_same_outcome,
    kill9,
    logged_step,
    outcome,
    start,
    train,
    uninterrupted,
    wait_for,
)


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (its data-loader workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "pid (comm) state"
                found.append(int(entry.name))
    return found


def test_a_data_loader_worker_killed_with_sigkill_ends_the_run_in_one_line_then_it_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("train", *RUN, f"output_dir={run_dir}", "data.num_workers=1", f"train.iters={ITERS * 4}")
    wait_for(lambda: logged_step(run_dir) >= 4 and bool(_children(proc.pid)), proc)
    os.kill(_children(proc.pid)[0], signal.SIGKILL)
    _, err = ended(proc, what="the run, after its data-loader worker was killed,")
    lines = err.strip().splitlines()
    assert proc.returncode not in (0, None) and len(lines) == 1, (proc.returncode, err)
    assert proc.returncode == 1 and lines[0].startswith("tmtseg: error: DataLoader worker (pid "), lines[0]
    last = list_checkpoints(run_dir)[-1]
    assert f"last good checkpoint: {last}; continue with --resume" in lines[0]  # what to do next, not a traceback
    assert logged_step(run_dir) < ITERS * 4
    train(run_dir, "data.num_workers=1", f"train.iters={ITERS * 4}", resume=True)
    assert logged_step(run_dir) == ITERS * 4


def test_a_worker_death_said_twice_by_torch_still_ends_in_the_converted_line(tmp_path, monkeypatch):
    """torch says a dead worker twice: the loader's "exited unexpectedly" in a step, then its SIGCHLD handler's "is
    killed by signal" at any later bytecode, e.g. while the loaders shut down. The second must not replace the line."""
    import tmtseg.engine.loop as loop

    real_close = loop.close_batches

    def step_finds_it_dead(run, *, progress):
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    def handler_fires_during_shutdown(batches):
        real_close(batches)
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(loop, "_train", step_finds_it_dead)
    monkeypatch.setattr(loop, "close_batches", handler_fires_during_shutdown)
    result = inproc("train", *RUN, f"output_dir={tmp_path / 'run'}", "data.num_workers=1")
    line = one_error(result, 1, "DataLoader worker (pid 4242)", "last good checkpoint: none; continue with --resume")
    assert " at step 1 " in line, line


def test_a_disk_that_fills_during_a_checkpoint_write_keeps_the_last_good_one_and_the_run_resumes(tmp_path, monkeypatch):
    import tmtseg.io.checkpoint as ckpt_mod

    run_dir = tmp_path / "run"
    real_save_file, calls = ckpt_mod.save_file, []

    def fills_up(tensors, path, metadata=None):  # the 4th file: the second checkpoint's training state (step 6)
        calls.append(path)
        if len(calls) == 4:
            Path(path).write_bytes(b"\0" * 100)  # part of it made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", fills_up)
    result = inproc("train", *RUN, f"output_dir={run_dir}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "tmtseg: unexpected error: OSError: [Errno 28] No space left on device (run with --debug for the traceback)"
    ]
    assert [p.name for p in list_checkpoints(run_dir)] == ["iter_0000003"]  # the last good one, whole
    assert latest_valid(run_dir) == run_dir / "checkpoints" / "iter_0000003"
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # nothing half-written left behind
    monkeypatch.setattr(ckpt_mod, "save_file", real_save_file)  # space freed
    train(run_dir, resume=True)
    assert logged_step(run_dir) == ITERS and latest_valid(run_dir).name == f"iter_{ITERS:07d}"


def ended(proc: subprocess.Popen, *, what: str, timeout: float = 90) -> tuple[str, str]:
    """Wait (bounded) for `proc` to end and return its (stdout, stderr); a hang is killed and fails, naming `what`."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(proc)
        raise AssertionError(f"{what} hung") from None


def sigterm_line(proc: subprocess.Popen, *, what: str = "the run", timeout: float = 90) -> str:
    """SIGTERM the whole process group (as a scheduler does) and wait: exit 143 and one line on stderr, returned."""
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = ended(proc, what=f"{what}, after SIGTERM,", timeout=timeout)
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, err)
    return lines[0]


def _stopped_by_sigterm(proc) -> str:
    """A training run sent SIGTERM: the one line names the step and the checkpoint it saved."""
    line = sigterm_line(proc)
    assert line.startswith("tmtseg: error: SIGTERM at step ") and line.endswith("continue with --resume"), line
    return line


def test_sigterm_during_an_evaluation_and_inside_a_save_stops_cleanly_then_resumes_exactly(tmp_path_factory, tmp_path):
    """Two moments other than between steps (test_failures.py has that one): during the evaluation of step 6, then,
    resumed, inside the save of a later step at a seeded random point of it (writing, before the rename, after it)."""
    reference = uninterrupted(tmp_path_factory)
    run_dir, rng, slow = tmp_path / "run", random.Random(29), 0.4
    proc = start("train", *RUN, f"output_dir={run_dir}", "data.num_workers=1")
    wait_for(lambda: logged_step(run_dir) >= 6, proc)  # step 6's line is written just before its evaluation
    line = _stopped_by_sigterm(proc)
    assert f"saved {run_dir / 'checkpoints' / 'iter_0000006'}" in line or "iter_0000007" in line, line
    target = rng.randint(8, ITERS - 1)
    proc = start("train", *RUN, f"output_dir={run_dir}", "train.save_every=1", "--resume",
                 env_extra={SLOW_SAVE_ENV: str(slow)})  # fmt: skip

    def saving() -> bool:
        return any(int(p.name.split("_")[2]) >= target for p in (run_dir / "checkpoints").glob(".tmp_iter_*"))

    wait_for(saving, proc)
    time.sleep(rng.uniform(0.0, slow))
    _stopped_by_sigterm(proc)
    assert logged_step(run_dir) < ITERS
    train(run_dir, resume=True)
    assert_same_outcome(reference, outcome(run_dir))


def test_a_reset_pipe_inside_the_data_loader_is_told_apart_from_one_elsewhere():
    """A worker killed while the loader reads its batch can surface as ConnectionResetError from the pipe (before
    torch's SIGCHLD handler speaks); the run says it as a worker's death only when the error came through the loader."""
    import torch

    from tmtseg.engine.loop import _from_data_loader

    class Reset(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(ConnectionResetError) as inside:
        next(iter(torch.utils.data.DataLoader(Reset(), num_workers=0)))
    assert _from_data_loader(inside.value)
    with pytest.raises(ConnectionResetError) as outside:
        raise ConnectionResetError(104, "Connection reset by peer")
    assert not _from_data_loader(outside.value)
