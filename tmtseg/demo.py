"""The built-in default job: a source model on synthetic "day" scenes, adapted to "dusk" by every method.

Prints a result table and writes pictures; finished runs are reused, so an interrupted demo continues.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import Config, load_config, load_config_over
from .methods import METHODS

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
# the target domain: a labelled dusk training split and a disjoint dusk evaluation split
TARGET = [
    "data.train.domain=dusk",
    "data.train.seed=2",
    "data.train.num_images=24",
    "data.val.domain=dusk",
    "data.val.seed=3",
    "data.val.num_images=16",
]


def demo_config(out: Path, overrides: list[str]) -> Config:
    return load_config([str(CONFIG)], [f"output_dir={out / 'source'}", *overrides])


def _run(cfg: Config, *, init: str, progress: bool) -> dict:
    from .runner import fit

    done = Path(cfg.output_dir) / "eval.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = (Path(cfg.output_dir) / "checkpoints").is_dir() and any((Path(cfg.output_dir) / "checkpoints").iterdir())
    return fit(cfg, init_from="" if resume else init, resume=resume, progress=progress)


def run_demo(out: Path, *, overrides: list[str] = (), progress: bool = True) -> dict:
    from .runner import evaluate_checkpoint

    source_cfg = demo_config(out, list(overrides))
    day = _run(source_cfg, init="", progress=progress)
    source_ckpt = str(Path(source_cfg.output_dir) / "checkpoints" / "best")
    if not Path(source_ckpt).exists():
        from .checkpoint import list_checkpoints

        source_ckpt = str(list_checkpoints(Path(source_cfg.output_dir))[-1])
    dusk_eval, _ = evaluate_checkpoint(source_ckpt, overrides=TARGET[3:], progress=False)
    rows = {"source-only (day val)": day, "source-only": dusk_eval}
    runs = {"source-only": source_ckpt}
    adapt_cfg = load_config_over(source_cfg, [*TARGET, "train.iters=150", "train.warmup_iters=0", "train.lr=1e-4"])
    for method in METHODS:
        cfg = load_config_over(
            adapt_cfg,
            [
                f"adapt.method={method}",
                f"adapt.source_checkpoint={source_ckpt}",
                f"output_dir={out / method}",
                f"name=demo-{method}",
            ],
        )
        rows[method] = _run(cfg, init=source_ckpt, progress=progress)
        runs[method] = str(
            Path(cfg.output_dir)
            / "checkpoints"
            / sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir() if p.name.startswith("iter_"))[-1]
        )
    table = format_results(rows)
    print(table)
    (out / "results.md").write_text(table + "\n")
    pictures = write_pictures(runs, out / "pictures", target_overrides=TARGET)
    print(f"pictures: {', '.join(str(p) for p in pictures)}")
    return rows


def format_results(rows: dict[str, dict]) -> str:
    lines = ["| run | mIoU | aAcc |", "|---|---:|---:|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['mIoU']:.2f} | {m['aAcc']:.2f} |")
    return "\n".join(lines)


def write_pictures(runs: dict[str, str], out: Path, *, target_overrides: list[str], count: int = 4) -> list[Path]:
    """A grid: image, ground truth, then each run's prediction, for `count` target evaluation images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import build_dataset
    from .predict import colorize, predict_array
    from .runner import trainer_from_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    loaded = {name: trainer_from_checkpoint(path, target_overrides) for name, path in runs.items()}
    _, cfg, meta = next(iter(loaded.values()))
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
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
