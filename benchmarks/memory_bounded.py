"""Peak memory of `tmtseg predict`, `tmtseg eval` and `tmtseg advise` (image level and `--regions`) against the
number of images (issue 29): it must not grow with the folder. Generates N small images (64x64 PNG, with 2-class
masks) into a temporary folder, trains a tiny model for one step to have a checkpoint, then runs each command over N
images in a fresh process and reads that process's peak resident memory (ru_maxrss of the one child, from os.wait4)
and its wall time.

    python benchmarks/memory_bounded.py     # predict, advise: N = 500, 2000, 10000; eval, advise --regions: 500, 2000
    python benchmarks/memory_bounded.py --sizes 50 400 --eval-sizes 50 400 --advise-sizes 50 400 --region-sizes 50 400
    python benchmarks/memory_bounded.py --sizes --eval-sizes 10000 --advise-sizes 500 2000 10000   # skip predict

Memory figures do not depend on the machine's load (a process's peak RSS is what it allocated, whoever else runs);
the wall times do, and are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = [  # tests/tiny.py's model: the figures are about what grows with N, not about the model
    "model.backbone.embed_dim=32", "model.backbone.depth=2", "model.backbone.num_heads=2",
    "model.backbone.patch_size=8", "model.conv_dim=32", "model.mask_dim=32", "model.hidden_dim=32", "model.nheads=2",
    "model.num_queries=6", "model.dec_layers=3", "model.dim_feedforward=64", "loss.num_points=256",
    "data.crop_size=[64,64]", "data.batch_size=2",
]  # fmt: skip


def make_images(folder: Path, n: int, *, size: int = 64, seed: int = 0) -> None:
    """n images (noise with a bright square, the square's mask beside it) and the dataset.yaml of a folder dataset."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    (folder / "dataset.yaml").write_text("classes: [background, square]\n")
    for i in range(n):
        label = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        label[y : y + size // 3, x : x + size // 3] = 1
        image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        image[label == 1] += 150
        Image.fromarray(image).save(folder / "images" / f"im{i:05d}.png")
        Image.fromarray(label).save(folder / "masks" / f"im{i:05d}.png")


def first(source: Path, dest: Path, n: int) -> Path:
    """A folder of the first n images of `source`, hard-linked (no copies, no second decode of the generator)."""
    make_dir = lambda p: p.mkdir(parents=True, exist_ok=True)  # noqa: E731
    for sub in ("images", "masks"):
        make_dir(dest / sub)
        for name in sorted(os.listdir(source / sub))[:n]:
            os.link(source / sub / name, dest / sub / name)
    (dest / "dataset.yaml").write_text((source / "dataset.yaml").read_text())
    return dest


def run(args: list[str], threads: int) -> tuple[float, float]:
    """`python -m tmtseg --no-progress ARGS` in a fresh process -> (its peak RSS in MiB, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tmtseg", "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not the running max over all children)
    seconds = time.perf_counter() - tic
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"tmtseg {' '.join(args[:1])} failed ({proc.returncode}):\n{err}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[500, 2000, 10000], help="image counts for predict")
    ap.add_argument("--eval-sizes", type=int, nargs="*", default=[500, 2000], help="image counts for eval")
    ap.add_argument(
        "--advise-sizes",
        type=int,
        nargs="*",
        default=[500, 2000, 10000],
        help="image counts for advise --budget 50 (image level)",
    )
    ap.add_argument(
        "--region-sizes", type=int, nargs="*", default=[500, 2000], help="image counts for advise --regions 5"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()
    print(f"torch threads {args.threads}, python {platform.python_version()}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        tic, largest = time.perf_counter(), max([*args.sizes, *args.eval_sizes, *args.advise_sizes, *args.region_sizes])
        make_images(root / "all", largest)
        make_images(root / "small", 4, seed=1)
        print(f"generated {largest} images in {time.perf_counter() - tic:.0f} s")
        folder = ["data.train.kind=folder", "data.val.kind=folder", "data.num_classes=2"]
        small = [f"data.train.path={root / 'small'}", f"data.val.path={root / 'small'}"]
        run(["train", *TINY, *folder, *small, "train.iters=1", "train.warmup_iters=0", f"output_dir={root / 'run'}"],
            args.threads)  # fmt: skip
        ckpt = root / "run" / "checkpoints" / "iter_0000001"
        commands = {  # name -> (sizes, the command's arguments over a folder d of n images)
            "predict": (args.sizes, lambda d, n: ["predict", str(ckpt), str(d / "images"), "--jsonl"]),
            "eval": (args.eval_sizes, lambda d, n: ["eval", str(ckpt), f"data.val.path={d}"]),
            "advise": (args.advise_sizes, lambda d, n: ["advise", str(ckpt), str(d / "images"), "--budget",
                                                        str(min(50, n))]),
            "regions": (args.region_sizes, lambda d, n: ["advise", str(ckpt), str(d / "images"), "--regions", "5"]),
        }  # fmt: skip
        rows = []
        for command, (sizes, argv) in commands.items():
            for n in sizes:
                data = root / f"n{n}" if (root / f"n{n}").exists() else first(root / "all", root / f"n{n}", n)
                out = root / f"{command}{n}{'.json' if command == 'eval' else ''}"
                rss, seconds = run([*argv(data, n), "--out", str(out)], args.threads)
                rows.append((command, n, rss, seconds))
                print(f"{command:8} N={n:>6}  peak RSS {rss:7.1f} MiB  {seconds:6.1f} s", flush=True)
    for command in commands:
        mine = [r for r in rows if r[0] == command]
        if len(mine) > 1:
            growth = (mine[-1][2] - mine[0][2]) / (mine[-1][1] - mine[0][1]) * 1024
            print(f"{command}: {growth:.2f} KiB more peak RSS per extra image ({mine[0][1]} -> {mine[-1][1]})")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
