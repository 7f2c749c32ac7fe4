"""The demo's picture: for a few images of the scored target split, the image, its ground truth and each method's
prediction side by side, with the class legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
