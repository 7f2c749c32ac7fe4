"""Running a bench: every unfinished run of the plan, `bench.jobs` at a time, each in a fresh process or a submitit
job (launch.py), recorded in results.jsonl when it finishes; re-running the same config skips finished runs and
resumes unfinished ones."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from tmtseg import config as config_mod
from tmtseg.config import Config
from tmtseg.engine.step import StopRequested
from tmtseg.errors import Preempted, TmtsegError, TrainingError
from tmtseg.tools.bench.launch import POLL_S, make_launcher
from tmtseg.tools.bench.plan import Run, plan
from tmtseg.tools.bench.progress import BenchProgress
from tmtseg.tools.bench.results import SessionLog, finished_runs, provenance, report
from tmtseg.tools.bench.spec import BenchConfig


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def execute(run: Run, threads: int) -> dict:
    """Run one unit of work in this (fresh) process; return its record. Errors come back as a record, not raised."""
    import torch

    from tmtseg.engine.evaluate import evaluate_checkpoint
    from tmtseg.engine.loop import fit
    from tmtseg.io.checkpoint import list_checkpoints

    torch.set_num_threads(threads)
    tic = time.perf_counter()
    record = {"key": run.key, "task": run.task, "pair": run.pair, "method": run.method, "seed": run.seed,
              "kind": run.kind, "hash": run.out.name, "dir": str(run.out)}  # fmt: skip
    final = run.out / "eval.json"
    # trained to the end but not recorded (killed in between): its final scores stand and nothing is redone
    trained = run.kind == "train" and final.exists() and json.loads(final.read_text())["step"] == run.cfg.train.iters
    try:
        if run.kind in ("score", "select"):  # the advise bench's choice of the labelled split (selection.py)
            from tmtseg.tools.bench.selection import execute_selection

            metrics = execute_selection(run)
        elif run.kind == "eval":
            metrics, _ = evaluate_checkpoint(run.init, overrides=_split_overrides(run.cfg), progress=False)
        elif trained:
            metrics = {k: v for k, v in json.loads(final.read_text()).items() if k not in ("step", "split")}
        else:
            resume = bool(list_checkpoints(run.out))
            metrics = fit(run.cfg, init_from="" if resume else run.init, resume=resume, progress=False)
    except TmtsegError as err:
        return {**record, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}", "exit_code": err.exit_code}
    cost = {"wall_s": None, "peak_rss_mib": None}  # unknown for a run recorded from its folder
    if not trained:
        cost = {"wall_s": time.perf_counter() - tic, "peak_rss_mib": _peak_rss_mib()}
    imgs = _mean_rate(run.out / "metrics.jsonl") if run.kind == "train" else None
    return {**record, "metrics": metrics, **cost, "imgs_per_s": imgs, "threads": threads}


def _split_overrides(cfg: Config) -> list[str]:
    """The eval split of `cfg` as dotted overrides for a checkpoint's own config."""
    d = config_mod.to_dict(cfg)["data"]
    return [f"data.root={json.dumps(d['root'])}", *(f"data.val.{k}={json.dumps(v)}" for k, v in d["val"].items())]


def _prune(run: Run, *, keep: str) -> None:
    """What a recorded run leaves on disk. The step checkpoints, kept for resuming, go (~100 MB each with DINOv2-S: a
    bench would fill the disk), and so does `best`'s training state (only step checkpoints are resumed from). `best`
    stays for source models (the only runs others start from, in this bench or another sharing its source_dir); for
    the others, when `keep` is "best"."""
    from tmtseg.io.checkpoint import STATE_FILE, list_checkpoints

    ckpts = run.out / "checkpoints"
    if run.kind != "train" or not (ckpts / "best").exists():
        return
    if keep == "sources" and run.method != "source":
        shutil.rmtree(ckpts, ignore_errors=True)
        return
    for ckpt in list_checkpoints(run.out):
        shutil.rmtree(ckpt, ignore_errors=True)
    (ckpts / "best" / STATE_FILE).unlink(missing_ok=True)


def _mean_rate(log: Path) -> float | None:
    rates = []
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "imgs_per_s" in rec:
                rates.append(rec["imgs_per_s"])
    return sum(rates) / len(rates) if rates else None


def _last_step(run: Run) -> int:
    """The last logged step of a running run (0 if none yet)."""
    log = run.out / "metrics.jsonl"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            lines = f.read().decode(errors="ignore").splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def run_bench(bench: BenchConfig, base: Path, *, progress: bool = True, write_report: bool = True) -> Path | None:
    """Run every unfinished run of the plan, `bench.jobs` at a time, each in a fresh process or, with
    `bench.launcher` slurm or local-submitit, a submitit job (launch.py); write the report.

    Returns the report's path (None when `write_report` is False: a first stage of the demo). Finished runs (recorded
    in results.jsonl with the same config hash) are skipped; a run folder with checkpoints is resumed. A failed run is
    reported and the others go on (those that need it are skipped); then TrainingError names the first failure.

    A SIGTERM starts nothing new and is passed on to the running runs (`launcher.stop`): each training run saves a
    checkpoint and comes back interrupted, which is not recorded; then Preempted (exit 143) says how many finished
    and how many were interrupted, and the same command resumes them, from their checkpoints, to the same scores.
    """
    from tqdm import tqdm

    p = plan(bench, base)
    out_dir = Path(bench.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _Bench(bench, p, out_dir)
    if progress and state.done:
        tqdm.write(f"{bench.name}: {len(state.done)} of {len(p.runs)} runs already finished")
    # to a log file (`nohup tmtseg bench ... > bench.log`): a line when a run ends or a minute passed, each once
    bar = BenchProgress(sum(state.cost.values()), bench.name, enabled=progress)
    with StopRequested() as stop, state.launcher as launcher:
        while state.active or (state.queue and not stop.flag):  # after a SIGTERM, until the running ones are back
            if stop.flag and not launcher.stop():  # submitit jobs go on; the next invocation finds their runs
                break
            if not stop.flag:
                state.submit()
            finished = launcher.finished(set(state.active), timeout=STOP_POLL_S if stop.flag else POLL_S)
            for handle in finished:
                state.collect(handle, stopping=stop.flag)
            units = state.finished_units + sum(min(_last_step(r), r.iters) for r in state.active.values())
            running = "; ".join(f"{r.key} {_last_step(r)}/{r.iters}" for r in state.active.values())
            bar.update(units, running, force=bool(finished))
    bar.close()
    if stop.flag:
        failed = f", {len(state.failed)} failed or skipped (named above)" if state.failed else ""
        raise Preempted(f"SIGTERM: stopped with {len(state.done)} of {len(p.runs)} runs finished, {state.interrupted}"
                        f" interrupted (checkpoint saved){failed}; continue with the same command")  # fmt: skip
    path = report(bench, base, p) if write_report else None
    if state.failed:
        first = next(iter(state.failed))
        rest = f" (report of the rest: {path})" if path else ""
        raise TrainingError(
            f"{len(state.failed)} bench run(s) failed or skipped, first {first}: {state.failed[first]}{rest}"
        )
    return path


STOP_POLL_S = 0.5  # after a SIGTERM: how often the runs are looked at (and sent it again, if one had not started yet)


class _Bench:
    """One invocation's runs: the queue, the running ones (a launcher's handle -> its run), the finished, failed and
    interrupted ones, and the files a finished run is recorded in."""

    def __init__(self, bench: BenchConfig, p, out_dir: Path) -> None:
        self.bench, self.results_file = bench, out_dir / "results.jsonl"
        self.done = finished_runs(p, bench)
        # sources first: each unblocks several runs, so the parallel lanes never wait for one at the end
        self.queue = sorted((r for r in p.runs if r.key not in self.done), key=lambda r: r.method != "source")
        self.launcher = make_launcher(bench)
        self.prov = provenance()
        self.cost = {r.key: max(r.iters, 10) for r in self.queue}  # work in steps (an evaluation counts as 10)
        self.failed: dict[str, str] = {}
        self.active: dict = {}
        self.finished_units = self.interrupted = 0
        self.session = SessionLog(out_dir / "sessions.jsonl", jobs=bench.jobs, threads=self.launcher.threads)

    def submit(self) -> None:
        """Start what may start: a free slot, and the run it needs finished (skipped if that one failed)."""
        waiting = {r.key for r in self.queue} | {r.key for r in self.active.values()}
        for r in list(self.queue):
            if r.after in self.failed:
                self.queue.remove(r)
                self.failed[r.key] = f"skipped: {r.after} failed"
            elif len(self.active) < self.launcher.slots and r.after not in waiting:
                self.queue.remove(r)
                self.active[self.launcher.submit(execute, r)] = r

    def collect(self, handle, *, stopping: bool) -> None:
        """A run came back: recorded (and pruned) if it finished; after a SIGTERM, one that stopped is interrupted."""
        from tqdm import tqdm

        r = self.active.pop(handle)
        rec = self.launcher.result(handle, r)
        self.finished_units += self.cost[r.key]
        if "error" in rec and stopping and (rec.get("exit_code") == Preempted.exit_code or rec.get("died")):
            self.interrupted += 1  # its checkpoint saved (or, an evaluation, nothing written): resumed next time
            return
        if "error" in rec:
            self.failed[r.key] = rec["error"]
            tqdm.write(f"tmtseg bench: {r.key} failed: {rec['error']} (run folder {r.out})")
            return
        _record(rec, self.prov, self.results_file)
        self.done[r.key] = rec
        _prune(r, keep=self.bench.keep)
        self.session.ran(rec)


def _record(rec: dict, prov: dict, results_file: Path) -> None:
    """Append a finished run's record, with the commit and machine, to results.jsonl."""
    rec.update(prov)
    with open(results_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
