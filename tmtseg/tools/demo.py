"""The built-in default job: the packaged `demo` bench (a source model on synthetic "day" scenes, adapted to "dusk" by
every method), its result table, and a picture of every method's predictions on the target.

Finished runs are reused and unfinished ones resumed, as in any bench: an interrupted demo continues.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from tmtseg.tools.bench import BenchConfig, load_bench, plan, run_bench


def run_demo(out: Path, *, overrides: list[str] = (), progress: bool = True) -> tuple[Path, list[Path]]:
    """Run the demo bench into `out`; returns (report, pictures). An override of a bench key (jobs, methods,
    tasks.synthetic.adapt, ...) changes the bench; any other (model.*, train.*, ...) applies to every run."""
    bench_keys = {f.name for f in fields(BenchConfig)}
    to_bench = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in bench_keys]
    to_runs = [o for o in overrides if o not in to_bench]
    bench_overrides = [f"output_dir={out}", *to_bench]
    if to_runs:
        bench_overrides.append(f"profiles.quick.overrides={json.dumps(to_runs)}")
    bench, base = load_bench("demo", bench_overrides)
    report = run_bench(bench, base, progress=progress)
    p = plan(bench, base)
    runs = {r.key: r for r in p.runs}
    checkpoints = {}  # method -> the checkpoint it is scored with (source-only: the source model's)
    for _task, _pair, method, _seed, key in p.cells:
        run = runs[key]
        checkpoints[method] = run.init if run.kind == "eval" else str(run.out / "checkpoints" / "best")
    eval_split = next(r for r in p.runs if r.method == "finetune").cfg.data.val
    pictures = write_pictures(checkpoints, out / "pictures", eval_split=eval_split)
    return report, pictures


def write_pictures(runs: dict[str, str], out: Path, *, eval_split, count: int = 4) -> list[Path]:
    """A grid: image, ground truth, then each run's prediction, for `count` images of the target evaluation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmtseg.data import build_dataset
    from tmtseg.engine.restore import model_with_loss_from_checkpoint
    from tmtseg.tools.predict import colorize, predict_array

    out.mkdir(parents=True, exist_ok=True)
    loaded = {name: model_with_loss_from_checkpoint(path) for name, path in runs.items()}
    _, cfg, meta = next(iter(loaded.values()))
    dataset = build_dataset(eval_split, cfg.data, train=False)
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    n = min(count, len(dataset))
    fig, axes = plt.subplots(n, 2 + len(loaded), figsize=(2.6 * (2 + len(loaded)), 2.2 * n), squeeze=False)
    for row in range(n):
        item = dataset[row]
        image = item["image"].permute(1, 2, 0).numpy()
        label = item["label"].numpy()
        panels = [("image", image), ("ground truth", colorize(label, palette, ignore_index=dataset.ignore_index))]
        for name, (trainer, run_cfg, _) in loaded.items():
            trainer.eval()
            pred = predict_array(
                trainer.model,
                image,
                scale=1.0,
                mode=run_cfg.infer.mode,
                crop=tuple(run_cfg.data.crop_size),
                stride=tuple(run_cfg.infer.stride),
                hooks=trainer.method.inference_hooks(),
            )
            panels.append((name, colorize(pred, palette)))
        for col, (title, arr) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(arr)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    handles = [
        matplotlib.patches.Patch(color=palette[i] / 255, label=name) for i, name in enumerate(dataset.class_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out / "predictions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
