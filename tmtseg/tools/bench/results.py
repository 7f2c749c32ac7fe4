"""A bench's records: the finished runs in results.jsonl (its own and those of the benches it reuses), the
invocations in sessions.jsonl, and what they give: the plan's state (describe) and the report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from tmtseg.engine.card import git_commit
from tmtseg.tools.bench.advise_report import advise_report
from tmtseg.tools.bench.curves import plot_budget
from tmtseg.tools.bench.plan import Plan, plan
from tmtseg.tools.bench.spec import BenchConfig
from tmtseg.tools.bench.tables import build_table, html_page, write_report


def read_results(path: Path) -> dict[str, dict]:
    """(key, hash) -> the newest finished record; a line cut short by a kill is ignored."""
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "metrics" in rec:
                out[f"{rec['key']}#{rec['hash']}"] = rec
    return out


def provenance() -> dict:
    """The commit and machine a bench ran on."""
    import torch

    commit = git_commit()
    return {"commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def _identity(key: str, run_hash: str) -> str:
    """What makes two runs the same run: task, pair (or domain), seed and config hash. The method's name is left out,
    so that a variant renamed, or promoted to a method's default, finds the runs it already made."""
    task, pair, _name, *seed = key.split("/")
    return "/".join([task, pair, *seed]) + "#" + run_hash


def finished_runs(p: Plan, bench: BenchConfig) -> dict[str, dict]:
    """The plan's finished runs by key: recorded with the same config hash in this bench's results.jsonl or in that
    of a bench it reuses (under whatever method name they were recorded: they are relabelled with the plan's)."""
    recorded = {}
    for folder in [*bench.reuse, bench.output_dir]:
        for rec in read_results(Path(folder) / "results.jsonl").values():
            recorded[_identity(rec["key"], rec["hash"])] = rec
    done = {}
    for r in p.runs:
        rec = recorded.get(_identity(r.key, r.out.name))
        if rec is not None:
            done[r.key] = {**rec, "key": r.key, "method": r.method}
    return done


def describe(bench: BenchConfig, base: Path) -> str:
    """The plan, one line per run: its state (done, partial, todo), steps and folder."""
    p = plan(bench, base)
    done = finished_runs(p, bench)
    lines = []
    for r in p.runs:
        state = "done" if r.key in done else ("partial" if (r.out / "checkpoints").is_dir() else "todo")
        lines.append(f"{state:8s} {r.key:48s} {r.iters:6d} steps  {r.out}")
    steps = sum(r.iters for r in p.runs if r.key not in done)
    lines.append(f"{len(p.runs)} runs, {len(done)} done; {steps} training steps to go")
    return "\n".join(lines)


def report(bench: BenchConfig, base: Path, p: Plan | None = None) -> Path:
    """Write report.md, runs.csv, runs.json and the plots from the finished runs of the plan."""
    p = p or plan(bench, base)
    out_dir = Path(bench.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # --report-only of a bench that only reuses other benches' runs
    done = finished_runs(p, bench)
    prof = bench.profiles[bench.profile]
    commits = sorted({r.get("commit", "") for r in done.values()} - {""})
    machine = sorted({r.get("machine", "") for r in done.values()} - {""})
    header = (
        f"Bench `{bench.name}`, profile `{bench.profile}` (seeds {prof.seeds}, {prof.pairs} pairs): "
        f"{len(done)} of {len(p.runs)} runs finished. Commit(s): {', '.join(commits) or 'unknown'}; "
        f"machine: {', '.join(machine) or 'unknown'}."
    )
    order = [r.key for r in p.runs]
    title = f"Benchmark: {bench.name}"
    sessions = read_sessions(out_dir / "sessions.jsonl")
    path = write_report(
        p.cells, done, order, out_dir, baseline=bench.baseline, title=title, header=header, sessions=sessions
    )
    sizes = {  # the pairs of the plan ("a->*" core pairs written out) whose target gives its labelled count
        f"{t}: {pair}": (pair.split("->")[0], bench.tasks[t].domains[pair.split("->")[1]].labelled)
        for t, pair, *_ in p.cells
        if "->" in pair and bench.tasks[t].domains[pair.split("->")[1]].labelled
    }
    if sizes and done:  # the budget bench: the score against the number of labelled target images
        plot_budget(build_table(p.cells, done), sizes, out_dir)
    advise_plots = advise_report(bench, p.cells, done, out_dir)  # the advise bench: selections and targets
    if advise_plots:  # report.html again, with the section and its plot
        plots = [q for q in (out_dir / "pairs.png", out_dir / "delta.png") if q.exists()] + advise_plots
        (out_dir / "report.html").write_text(html_page(path.read_text(), plots))
    return path


def read_sessions(path: Path) -> list[dict]:
    """The last line of each session in a sessions.jsonl (see SessionLog), oldest first."""
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            last[rec["start"]] = rec
    return list(last.values())


class SessionLog:
    """One invocation of the bench in `<output_dir>/sessions.jsonl`: a line each time a run finishes (its start, the
    time elapsed and the runs finished so far), so that a bench run over several invocations, killed or not, can state
    its machine time (tables.markdown sums each session's last line)."""

    def __init__(self, path: Path, *, jobs: int, threads: int):
        self.path, self.tic, self.runs = path, time.perf_counter(), 0
        self.line = {"start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": jobs, "threads": threads}
        self.cut = path.exists() and not path.read_bytes().endswith(b"\n")  # the last line cut by a kill

    def ran(self, rec: dict) -> None:
        self.runs += 1
        line = {**self.line, "elapsed_s": round(time.perf_counter() - self.tic, 1), "runs": self.runs,
                "load1": round(os.getloadavg()[0], 2), "commit": rec.get("commit", "")}  # fmt: skip
        with open(self.path, "a") as f:
            f.write("\n" * self.cut + json.dumps(line) + "\n")
        self.cut = False
