"""tmtseg bench's launchers: one submitit job per run (LocalExecutor here: real subprocesses), a job killed mid-run and
resumed from its checkpoint by the next invocation; the Slurm job script the flags write; a method alias in a bench."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.test_bench import _bench_file, _lines
from tmtseg.cli.parser import build_parser
from tmtseg.errors import ConfigError, TrainingError
from tmtseg.tools.bench import load_bench, plan, run_bench
from tmtseg.tools.bench.launch import SubmititLauncher


def _wait_for(path: Path, seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_local_submitit_runs_each_run_as_a_job_and_resumes_a_killed_one(tmp_path):
    source = ["train.iters=40", "train.save_every=2", "train.keep_last=1"]
    file = _bench_file(tmp_path, methods=["source-only", "finetune"], launcher="local-submitit")
    spec = yaml.safe_load(file.read_text())
    spec["tasks"]["synthetic"]["source"] = source
    file.write_text(yaml.safe_dump(spec))
    bench, base = load_bench(str(file))
    src = next(r for r in plan(bench, base).runs if r.method == "source")
    failure: list[BaseException] = []

    def first_invocation() -> None:
        try:
            run_bench(bench, base, progress=False)
        except BaseException as err:  # noqa: B036 - the thread hands the bench's error to the test
            failure.append(err)

    thread = threading.Thread(target=first_invocation)
    thread.start()
    _wait_for(src.out / "checkpoints" / "iter_0000002")
    holder = json.loads((src.out / ".lock").read_text())["pid"]  # the job's process, training the source model
    assert holder != os.getpid()
    os.kill(holder, signal.SIGKILL)  # a node lost: no exception, no clean-up
    thread.join(timeout=300)
    assert not thread.is_alive() and len(failure) == 1 and isinstance(failure[0], TrainingError)
    assert "ended without a result" in str(failure[0]) and "run the bench again" in str(failure[0])
    results = bench.output_dir + "/results.jsonl"
    assert not Path(results).exists() or all(r["method"] != "source" for r in _lines(Path(results)))
    kept = {r["step"]: line for r, line in _logged(src.out)}  # what the killed job logged
    ckpt_step = int(next((src.out / "checkpoints").glob("iter_*")).name.split("_")[1])
    assert 2 <= ckpt_step < 40

    report = run_bench(bench, base, progress=False)  # the next invocation: the same folders, hash and report
    assert report.exists() and "| finetune |" in report.read_text()
    records = {r["method"]: r for r in _lines(Path(results))}
    assert set(records) == {"source", "source-only", "finetune"} and records["source"]["hash"] == src.out.name
    steps = [r["step"] for r, _ in _logged(src.out)]
    assert steps == list(range(1, 41))  # every step once: resumed at its checkpoint, not restarted
    # the lines up to the checkpoint are the killed job's own, kept byte for byte (a restart would rewrite them)
    assert all(line == kept[step] for r, line in _logged(src.out) if (step := r["step"]) <= ckpt_step)
    jobs = [p for p in (Path(bench.output_dir) / "submitit").iterdir() if p.name.isdigit()]  # a folder per job id
    assert len(jobs) == 4  # a job per run: the killed source, its resumption, source-only, finetune


def _logged(run_dir: Path) -> list[tuple[dict, str]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(rec, line) for line in lines if "loss" in (rec := json.loads(line))]


def test_slurm_flags_become_each_jobs_sbatch_lines(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 0))  # as on a machine without srun
    with pytest.raises(ConfigError, match="launcher=slurm"):  # no Slurm on this machine: one line, exit 2
        SubmititLauncher(load_bench("demo", [f"output_dir={tmp_path}", "launcher=slurm"])[0], "slurm")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # as if srun were here
    args = build_parser().parse_args(
        ["bench", "demo", "--launcher", "slurm", "--partition", "gpu", "--gpus-per-run", "2", "--time-limit", "90"]
    )
    assert (args.launcher, args.partition, args.gpus_per_run, args.time_limit) == ("slurm", "gpu", 2, 90)
    keys = ["launcher=slurm", "slurm.partition=gpu", "slurm.gpus_per_run=2", "slurm.time_min=90", "slurm.mem_gb=16"]
    bench, _ = load_bench("demo", [f"output_dir={tmp_path}", *keys])
    launcher = SubmititLauncher(bench, "slurm")
    script = launcher.executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=90", "--cpus-per-task=4", "--mem=16GB"):
        assert f"#SBATCH {line}\n" in script
    assert str(tmp_path / "submitit") in script  # job files and logs beside the runs
    with pytest.raises(ConfigError, match="launcher"):
        load_bench("demo", ["launcher=pbs"])
    with pytest.raises(ConfigError, match="time_min"):
        load_bench("demo", ["slurm.time_min=0"])


def test_a_method_alias_in_a_bench_runs_its_recipe(tmp_path):
    bench, base = load_bench(str(_bench_file(tmp_path, methods=["source-only", "recommended", "finetune"])))
    run = next(r for r in plan(bench, base).runs if r.method == "recommended")
    assert run.key == "synthetic/day->dusk/recommended/seed0"
    assert run.cfg.adapt.method == "lora" and run.cfg.adapt.preserve.methods == ["lora"]
