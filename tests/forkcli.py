"""`python -m tmtseg ARGS` to completion, without paying for Python, torch and tmtseg's imports on every call.

A test that runs the command line starts a process; most of what such a process costs on a tiny config is its start
(about 2 s of CPU to import torch and the package, against a fraction of that for the run). Here each call runs in a
process forked from multiprocessing's fork server, which imported torch and tmtseg.cli once and never computes (so no
thread pool exists when it forks): the call still gets its own process, with the environment, working directory,
argv and exit code of the real command, its stdout and stderr captured from the file descriptors (so third-party C
output is caught too), atexit handlers run, and a timeout. What it cannot show is output printed while those modules
import; the tests that read a first start's output run the real subprocess (`fresh=True`), and TMTSEG_TEST_FRESH=1
sends every call there (the whole suite then runs as before, slower).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "tmtseg.cli", "tests.forkcli"]
_context: multiprocessing.context.ForkServerContext | None = None


def fresh_only() -> bool:
    return os.environ.get("TMTSEG_TEST_FRESH", "") not in ("", "0")


def run(args: list[str], *, env: dict, cwd: Path, timeout: float, fresh: bool = False) -> subprocess.CompletedProcess:
    """Like subprocess.run([python, -m, tmtseg, *args], capture_output=True, text=True): a CompletedProcess."""
    cmd = [sys.executable, "-m", "tmtseg", *args]
    if fresh or fresh_only():
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="tmtseg-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _context.Process(target=_child, args=(list(args), dict(env), str(cwd), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, output=_read(out), stderr=_read(err))
        return subprocess.CompletedProcess(cmd, proc.exitcode, _read(out), _read(err))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _child(args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: the command's environment and file descriptors, then tmtseg's main as `-m` runs it."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    import tmtseg
    from tmtseg.cli import main

    # the fork server imported torch under the test worker's thread count; a new process reads its own environment
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    sys.argv = [str(Path(tmtseg.__file__).parent / "__main__.py"), *args]
    try:
        code = main()
    except SystemExit as stop:  # argparse's usage errors and --help
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        atexit._run_exitfuncs()  # as an interpreter's exit would (multiprocessing's children end with os._exit)
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)
