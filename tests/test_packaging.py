"""The wheel: it holds every file tmtseg reads at run time, and a fresh virtual environment runs tmtseg from it (not
from the source tree), with the dependencies of this interpreter instead of a second download of torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args, **kw) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=240, **kw)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_wheel_holds_every_file_and_runs_from_a_fresh_venv(tmp_path):
    # build from a copy of the sources: pip writes build/ and tmtseg.egg-info beside what it builds. Without build
    # isolation, so that nothing is downloaded (setuptools comes with the dev extra)
    src = tmp_path / "src"
    shutil.copytree(REPO / "tmtseg", src / "tmtseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist")
    wheel = next((tmp_path / "dist").glob("tmtseg-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {p.relative_to(src).as_posix() for p in (src / "tmtseg").rglob("*") if p.is_file()}
    assert package - names == set(), "files of tmtseg/ missing from the wheel (pyproject.toml's package-data)"
    assert {"tmtseg/configs/demo.yaml", "tmtseg/configs/bench/demo.yaml", "tmtseg/configs/bench/core.yaml"} <= names

    # a venv without pip; the wheel unpacked by this pip into a folder of its own; a .pth puts that folder, then this
    # interpreter's site-packages (torch and the rest, not their .pth files: an editable tmtseg there stays off), on
    # the venv's path
    venv, target = tmp_path / "venv", tmp_path / "site"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (next(venv.glob("lib/python*/site-packages")) / "deps.pth").write_text("\n".join([str(target), *deps]) + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(python, "-c", "import tmtseg.tools.bench.spec as s; print(s.__file__); print(s.PACKAGED)", env=env,
                 cwd=tmp_path).split()  # fmt: skip
    assert all(Path(p).is_relative_to(target) for p in where), where  # the wheel's files, not the source tree's
    assert "--quick" in _run(python, "-m", "tmtseg", "demo", "--help", env=env, cwd=tmp_path)
    # the demo's bench and run configs, read from the installed package data
    plan = _run(python, "-m", "tmtseg", "bench", "demo", "--dry-run", f"output_dir={tmp_path / 'b'}", env=env,
                cwd=tmp_path)  # fmt: skip
    for key in ("synthetic/day/source/seed0", "synthetic/day->dusk/recommended/seed0", "5 runs, 0 done"):
        assert key in plan
