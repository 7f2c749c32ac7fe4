"""Where a bench's runs execute (bench key `launcher`, `tmtseg bench --launcher`): each launcher runs the same
`execute(run, threads)` of run.py, one run per process or job, in the same run folders, so hashes, resume and the
report do not depend on it.

- `local` (default): a new process per run on this machine, `jobs` at a time, forked from a server that imported
  torch and the training code once (spawned where a platform has no fork server).
- `slurm`: one submitit job per run on a Slurm cluster (`pip install 'tmtseg[slurm]'`), `jobs` in the queue at a
  time, with the bench's `slurm` keys (partition, GPUs, CPUs, time limit, memory).
- `local-submitit`: the same submitit jobs run by submitit's LocalExecutor on this machine, real subprocesses: the
  cluster path checked without a cluster (the tests use it).

A job that dies (killed, cut off by its time limit, its node lost) comes back as a failed run; running the bench
again resumes it from its last checkpoint, as after any kill.

A SIGTERM to the bench reaches the runs through `stop()`: local processes are sent it (each training run finishes its
step, saves a checkpoint and comes back as Preempted, exit 143) and the bench waits for them; submitit jobs are left
running, as when the bench is killed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, get_all_start_methods, get_context
from pathlib import Path

from tmtseg.errors import ConfigError, MissingExtra, TrainingError
from tmtseg.tools.bench.spec import BenchConfig

POLL_S = 5.0  # how often the bench looks at its runs (and refreshes its progress bar)
# what the fork server of the local launcher imports once, so that a run's process starts with it (about 2 s of CPU
# a run otherwise, most of a tiny run's cost); torch._dynamo too, which the optimizer's first use imports (1.2 s a
# run; it starts no thread)
PRELOAD = ["torch", "torch._dynamo", "tmtseg.tools.bench.run", "tmtseg.engine.loop", "tmtseg.engine.evaluate"]


def local_threads(bench: BenchConfig) -> int:
    """Torch threads per run on this machine: `threads`, else the cores shared among the `jobs` parallel runs."""
    return bench.threads or max(1, (os.cpu_count() or 1) // bench.jobs)


def _init_worker() -> None:
    """A local worker as a run needs it. It ignores SIGTERM until a run inside it installs its own handler (training
    and evaluation do, and put this back when they end): a SIGTERM sent to the bench's whole process group must stop
    the runs, not kill an idle worker, which would break the pool and lose the results of the others."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked in the fork server (_run_context)
    # a process the fork server starts inherits its start method; a run's data-loader workers start as `tmtseg
    # train` starts them (the platform's default), not through a fork server of their own
    multiprocessing.set_start_method(None, force=True)


def _run_context():
    """The processes' start method: multiprocessing's fork server with PRELOAD imported, started with SIGTERM blocked
    (inherited through its exec), so that a SIGTERM to the bench's process group leaves it alive to report how its
    workers ended (without it a worker's end reads as a crash); `spawn` where there is no fork server. Blocked, not
    ignored, in the bench meanwhile: a SIGTERM arriving then is delivered when the mask is restored."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return context


class LocalLauncher:
    """A new process per run (one run each: clean peak memory, nothing shared between runs, forked from a server that
    only imported the code: _run_context), `jobs` at a time."""

    name = "local"

    def __init__(self, bench: BenchConfig) -> None:
        self.slots, self.threads = bench.jobs, local_threads(bench)

    def __enter__(self) -> LocalLauncher:
        self.pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=_run_context(), max_tasks_per_child=1,
                                        initializer=_init_worker)  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def submit(self, fn, run):
        return self.pool.submit(fn, run, self.threads)

    def finished(self, handles, timeout: float = POLL_S) -> set:
        return wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)[0] if handles else set()

    def result(self, handle, run) -> dict:
        try:
            return handle.result()
        except BrokenProcessPool as err:  # a worker died (killed; SIGTERM before it could ignore it): the others too
            return {"key": run.key, "exit_code": TrainingError.exit_code, "died": True,
                    "error": f"its process ended without a result ({_first_line(err)}); run the bench again to resume"
                             " it"}  # fmt: skip

    def stop(self) -> bool:
        """Send SIGTERM to the worker processes (a worker between runs ignores it); True: wait for their results."""
        for process in list(self.pool._processes.values()):  # the executor's own table of its live workers
            try:
                os.kill(process.pid, signal.SIGTERM)
            except (ProcessLookupError, AttributeError):  # ended meanwhile
                pass
        return True


class SubmititLauncher:
    """One submitit job per run: on Slurm (`cluster="slurm"`) or with submitit's LocalExecutor (`cluster="local"`)."""

    def __init__(self, bench: BenchConfig, cluster: str) -> None:
        try:
            import submitit
        except ImportError:
            raise MissingExtra(f"launcher {bench.launcher} needs submitit: pip install 'tmtseg[slurm]'") from None
        s = bench.slurm
        self.name, self.slots, self.local = bench.launcher, bench.jobs, cluster == "local"
        self.threads = s.cpus_per_run or bench.threads or (local_threads(bench) if self.local else 4)
        folder = Path(s.folder or Path(bench.output_dir) / "submitit") / "%j"
        try:
            self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        except RuntimeError as err:  # no srun / sbatch on this machine
            raise ConfigError(f"bench key launcher={bench.launcher}: {_first_line(err)}") from None
        params = {"name": f"tmtseg-{bench.name}", "timeout_min": s.time_min, "nodes": 1, "tasks_per_node": 1,
                  "cpus_per_task": self.threads, "gpus_per_node": s.gpus_per_run}  # fmt: skip
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if s.partition:
            params["slurm_partition"] = s.partition
        self.executor.update_parameters(**params)

    def __enter__(self) -> SubmititLauncher:
        return self

    def __exit__(self, *exc) -> None:
        pass  # jobs still queued or running when the bench stops keep going; the next invocation finds their runs

    def submit(self, fn, run):
        try:
            job = self.executor.submit(fn, run, self.threads)
        except Exception as err:  # sbatch missing or refusing the job: one line, the bench stops
            raise TrainingError(f"launcher {self.name}: submitting {run.key} failed: {_first_line(err)}") from None
        if self.local:  # a job that ended without a result file: submitit waits 15 s for a slow shared file system
            job._results_timeout_s = 0  # to show it; a local folder has it at once (what submitit's own tests set)
        return job

    def stop(self) -> bool:
        """Jobs are not signalled (Slurm sends its own SIGTERM at a time limit): False, do not wait for them."""
        return False

    def finished(self, handles, timeout: float = POLL_S) -> set:
        end = time.monotonic() + timeout
        while True:
            done = {h for h in handles if h.done()}
            if done or time.monotonic() >= end:
                return done
            time.sleep(min(0.5, timeout))

    def result(self, job, run) -> dict:
        try:
            return job.result()
        except Exception as err:  # the job died without returning: killed, cut off by its time limit, node lost
            return {"key": run.key, "exit_code": TrainingError.exit_code,
                    "error": f"job {job.job_id} ended without a result ({_first_line(err)}); run the bench again to "
                             f"resume it, logs in {job.paths.folder}"}  # fmt: skip


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def make_launcher(bench: BenchConfig) -> LocalLauncher | SubmititLauncher:
    """The launcher `bench.launcher` names (validated by load_bench)."""
    if bench.launcher == "local":
        return LocalLauncher(bench)
    return SubmititLauncher(bench, "slurm" if bench.launcher == "slurm" else "local")
