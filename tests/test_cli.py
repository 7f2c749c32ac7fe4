"""Clear failures (issue 6 §4), through the real command: every user-facing error is one line `tmtseg: error: ...`
naming the file or key, with its documented exit code and no traceback unless --debug. (Non-finite loss -> 4 and
SIGTERM -> 143 are in test_failures.)"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tmtseg.cli import EPILOG, _one_line
from tmtseg.errors import DataError
from tmtseg.io.checkpoint import list_checkpoints

from .test_resume import ITERS, REPO, RUN, cli, uninterrupted_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run folder of RUN: the session's one reference run (tests/test_resume.py), read, never changed."""
    return uninterrupted_dir(tmp_path_factory)


def _one_error_line(result, code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmtseg: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_exit_codes_are_documented_in_the_help():
    help_text = cli("--help").stdout
    for code in ("0 ok", "1 unexpected error", "2 bad config", "3 bad checkpoint", "4 training failed", "143 SIGTERM"):
        assert code in EPILOG and code in " ".join(help_text.split())


def _subcommands(parser, words=()):
    """(the words typed, the parser) of every command and nested command under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from _subcommands(sub, (*words, name))


def test_every_commands_help_says_what_it_does_with_an_example():
    from tmtseg.cli.parser import build_parser

    parser = build_parser()
    commands = dict(_subcommands(parser))
    assert {" ".join(w) for w in commands} >= {"train", "adapt", "eval", "predict", "export", "bench", "data check",
                                               "weights get", "demo"}  # fmt: skip
    for words, sub in [((), parser), *commands.items()]:
        text = sub.format_help()
        assert sub.description and len(sub.description.split()) >= 8, words  # a sentence, not a label
        assert " ".join(sub.description.split()) in " ".join(text.split()), words
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line in ("example:", "examples:"))
        example = []  # the indented lines after the heading
        for line in lines[at + 1 :]:
            if line.startswith("  "):
                example.append(line.strip())
            elif example:
                break
        typed = " ".join(("tmtseg", *words))
        assert example and all(typed in x for x in example), (words, example)  # the command itself, runnable as shown
        # an example runs through the parser as written: its arguments and flags exist
        for line in example:
            argv = line.split(">")[0].split()
            argv = argv[argv.index("tmtseg") + 1 :]
            parser.parse_known_args(argv)


def test_bad_config_key_names_the_key_and_debug_shows_the_traceback(tmp_path):
    args = ["train", "data.bogus=1", f"output_dir={tmp_path}"]
    line = _one_error_line(cli(*args), 2)
    assert "data.bogus" in line
    debug = cli("--debug", *args)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


def test_a_forked_command_prints_and_exits_as_a_new_interpreter_does(trained, tmp_path):
    """The suite runs `tmtseg` forked from a server that imported it (tests/forkcli.py): the same output, line for line,
    and exit code as `python -m tmtseg` in a new interpreter, for a command that prints a data table, a precision line
    and scores (an evaluation), and for one that fails."""
    ckpt = list_checkpoints(trained)[-1]
    for fresh in (False, True):
        out = tmp_path / f"fresh{fresh}.json"
        done = cli("eval", str(ckpt), "data.val.num_images=2", "--out", str(out), fresh=fresh)
        bad = cli("eval", str(ckpt), "data.val.bogus=1", fresh=fresh)
        if not fresh:
            forked = (done.returncode, done.stdout.replace(out.name, "OUT"), done.stderr, bad.returncode, bad.stderr)
    assert forked == (done.returncode, done.stdout.replace(out.name, "OUT"), done.stderr, bad.returncode, bad.stderr)
    assert done.returncode == 0 and done.stdout.startswith("class shares per split") and bad.returncode == 2


def test_the_fork_servers_imports_start_no_thread():
    """tests/forkcli.py forks every call from a server that imported its PRELOAD, and the bench's local launcher every
    run from one that imported its own: a thread started by those imports, alive at a fork (holding a lock the child
    then waits on forever), would hang commands at random. Under the workers' one-thread settings the suite's server
    has its main thread only; the bench's imports add no thread to what `import torch` starts."""
    import subprocess
    import sys

    from tmtseg.tools.bench.launch import PRELOAD as BENCH

    from .forkcli import PRELOAD

    code = "import importlib, os; n = lambda: len(os.listdir('/proc/self/task')); import torch; print(n()); "
    code += (
        "[importlib.import_module(m) for m in {!r}]; print(n()); [importlib.import_module(m) for m in {!r}]; print(n())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code.format(BENCH, PRELOAD)]  # one interpreter: threads, once started, stay
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1"]  # after torch, after the bench's imports, after the suite's


def test_usage_errors_are_one_line_too():
    result = cli("train", "--no-such-flag", fresh=True)  # a new interpreter: nothing else, from any import either
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tmtseg: error: unrecognized arguments: --no-such-flag (see tmtseg --help)"
    ]
    result = cli("train", "--nproc", "two")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tmtseg train: error: argument --nproc: invalid int value: 'two' (see tmtseg train --help)"
    ]


def test_missing_data_path_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    line = _one_error_line(
        cli("train", *RUN, "data.train.kind=folder", f"data.train.path={missing}", f"output_dir={tmp_path / 'run'}"), 2
    )
    assert str(missing) in line


def test_unwritable_output_dir_names_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should go")
    line = _one_error_line(cli("train", *RUN, f"output_dir={blocker / 'run'}"), 2)
    assert "output_dir" in line and str(blocker / "run") in line


def test_corrupt_checkpoint_names_the_file(tmp_path, trained):
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes((trained / "checkpoints" / "best" / "model.safetensors").read_bytes()[:1000])
    line = _one_error_line(cli("eval", str(corrupt)), 3)
    assert line.startswith(f"tmtseg: error: {corrupt}: unreadable checkpoint")
    line = _one_error_line(cli("finetune", *RUN, "--checkpoint", str(corrupt), f"output_dir={tmp_path / 'ft'}"), 3)
    assert str(corrupt) in line


class _Payload:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.pth", "model.safetensors"])
def test_a_pickle_with_code_in_it_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    line = _one_error_line(cli("eval", str(path)), 3)
    assert str(path) in line and "pickle" in line and "refused" in line
    assert not marker.exists()


def test_checkpoint_that_does_not_fit_lists_keys_and_shapes(tmp_path, trained, tiny_cityscapes):
    """The 5-class source model fine-tuned on the 19 Cityscapes classes, with a wider decoder FFN."""
    best = trained / "checkpoints" / "best"
    cityscapes = [
        "data.num_classes=19",
        *(f"data.{s}.{k}" for s in ("train", "val") for k in ("kind=cityscapes", f"path={tiny_cityscapes}")),
        "data.train.domain=train",
        "data.val.domain=val",
        "model.dim_feedforward=48",
    ]
    line = _one_error_line(
        cli("finetune", *RUN, *cityscapes, "--checkpoint", str(best), f"output_dir={tmp_path / 'ft'}"), 3
    )
    assert line.startswith(f"tmtseg: error: {best}: checkpoint does not fit the model: ")
    assert "decoder.class_embed.weight (6, 32) != model (20, 32)" in line
    assert "decoder.layers.0.ffn.fc1.weight (64, 32) != model (48, 32)" in line and "... 3 more" in line


def test_resume_with_a_changed_config_prints_the_differing_fields(tmp_path, trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, symlinks=True)
    line = _one_error_line(
        cli("train", *RUN, "model.num_queries=7", "train.lr=0.001", f"output_dir={run_dir}", "--resume"), 2
    )
    ckpt = run_dir / "checkpoints" / f"iter_{ITERS:07d}"
    assert line == (
        f"tmtseg: error: {ckpt}: the config differs from the run being resumed:"
        " model.num_queries: 6 -> 7; train.lr: 0.0002 -> 0.001"
    )


def test_errors_from_data_loader_workers_keep_their_own_message():
    # a DataLoader re-raises a worker's error with the worker's traceback as its message
    err = DataError(
        "Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise DataError(msg)\ntmtseg.errors.DataError: a/b.png: unreadable image\n'
    )
    assert _one_line(err) == "a/b.png: unreadable image"
    assert _one_line(DataError("plain message")) == "plain message"
