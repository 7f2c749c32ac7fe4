"""`python -m tmtseg ARGS` run or started, without paying for Python, torch and tmtseg's imports on every call.

A test that runs the command line starts a process; most of what such a process costs on a tiny config is its start
(about 2 s of CPU to import torch and the package, against a fraction of that for the run). Here each call runs in a
process forked from multiprocessing's fork server, which imported torch and tmtseg.cli once and never computes (so no
thread pool exists when it forks). The call still gets a process of its own, with the environment, working
directory, argv and exit code of the real command, its stdout and stderr captured from the file descriptors (so
third-party C output is caught too), atexit handlers run at its end, and a timeout. `Started` is the command started
in a session of its own (as start_new_session), for the tests that signal or kill it, with the part of
subprocess.Popen they use. What neither can show is output printed while those modules import: the tests that read
a first start's output run a new interpreter (`fresh=True`), and TMTSEG_TEST_FRESH=1 sends every call there (the
suite then runs as before, slower).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tmtseg.tools.bench.launch import PRELOAD as BENCH_PRELOAD

# what nearly every command imports, imported once by the server rather than by each call: torch._dynamo (the
# optimizer's first use imports it: 1.2 s), the parser and what its advise options import (the data package, scipy),
# the training loop: 80 s -> 41 s for test_inputs, test_resume, test_faults and test_failures run serially. With the
# bench's own list: a worker's in-process benches share multiprocessing's one fork server (start_server). Imports
# that start no thread under the workers' OMP_NUM_THREADS=1 (tests/test_cli.py checks it) and that read no variable a
# test sets for one command (torch._dynamo reads TORCHDYNAMO_* once: no test sets those)
PRELOAD = [*BENCH_PRELOAD, "tmtseg.cli", "tmtseg.cli.parser", "tmtseg.tools.advise_select", "scipy.optimize",
           "tests.forkcli"]  # fmt: skip
_context: multiprocessing.context.ForkServerContext | None = None


def fresh_only() -> bool:
    return os.environ.get("TMTSEG_TEST_FRESH", "") not in ("", "0")


def run(args: list[str], *, env: dict, cwd: Path, timeout: float, fresh: bool = False) -> subprocess.CompletedProcess:
    """Like subprocess.run([python, -m, tmtseg, *args], capture_output=True, text=True): a CompletedProcess."""
    if fresh or fresh_only():
        cmd = [sys.executable, "-m", "tmtseg", *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    proc = Started(args, env=env, cwd=cwd, session=False)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Started:
    """`python -m tmtseg ARGS` started in a forked process, by default in a session of its own (its pid is its process
    group, as with start_new_session=True): pid, poll, wait, communicate, send_signal, kill, terminate, returncode
    and stdout.readline, as subprocess.Popen(..., text=True) has them."""

    def __init__(self, args: list[str], *, env: dict, cwd: Path, session: bool = True):
        self.args = [sys.executable, "-m", "tmtseg", *args]
        self._tmp = tempfile.TemporaryDirectory(prefix="tmtseg-cli-")
        self._out, self._err = Path(self._tmp.name) / "stdout", Path(self._tmp.name) / "stderr"
        self._proc = _server().Process(target=_child, args=(list(args), dict(env), str(cwd), str(self._out),
                                                            str(self._err), session))  # fmt: skip
        self._proc.start()
        self.pid = self._proc.pid
        self.stdout = _Lines(self._out, self)

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end; (the stdout not read yet, the stderr)."""
        self.wait(timeout)
        return self.stdout.rest(), _read(self._err)

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Lines:
    """A started command's stdout read line by line while it runs: the file it writes to, polled."""

    def __init__(self, path: Path, proc: Started):
        self.path, self.proc, self.offset = path, proc, 0

    def readline(self) -> str:
        """The next whole line; at the end of the command, what is left (possibly "")."""
        while True:
            ended = self.proc.poll() is not None  # before reading: all it wrote is in the file then
            text = _read(self.path)[self.offset :]
            line = text[: text.index("\n") + 1] if "\n" in text else (text if ended else "")
            if line or ended:
                self.offset += len(line)
                return line
            time.sleep(0.01)

    def rest(self) -> str:
        text = _read(self.path)[self.offset :]
        self.offset += len(text)
        return text


def start_server() -> None:
    """The fork server started now, with PRELOAD (tests/conftest.py, at a worker's start): multiprocessing has one
    fork server per process, and a bench run in-process (tmtseg.tools.bench.launch) would otherwise start it with
    the bench's list alone whenever its test came first, and every later call here would import the rest."""
    if not fresh_only():
        _server()
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _child(args: list[str], env: dict, cwd: str, out: str, err: str, session: bool) -> None:
    """In the forked process: the command's session, environment and file descriptors, then tmtseg's main as `-m`
    runs it."""
    if session:
        os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # as a new interpreter started here has it, whoever started
    # the server (the bench's launcher starts its own with SIGTERM blocked)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # a program of its own, as `python -m tmtseg` is, not a multiprocessing child (what a bench's worker is: the
    # evaluation leaves its data table out there)
    multiprocessing.process._parent_process = None
    multiprocessing.set_start_method(None, force=True)  # its data-loader workers start as the platform's default
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
