"""The model card: README.md beside a model (the Hugging Face convention), written by every training run into its run
folder and by `save_pretrained`: what the model is, the data it saw, the method, its scores, how it trained, the
software, and the lines that load and use it."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from tmtseg.adapt.registry import METHODS, SECTIONS, piece_sections, regularisers_of, tuning_of
from tmtseg.config import Config

CARD_FILE = "README.md"


def git_commit() -> str:
    """The commit of the checkout holding tmtseg/ ("+dirty" if tracked files changed), or "" outside a checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def _split(split) -> str:
    """One split as a reader names it: its kind and the keys that select it (defaults left out)."""
    own = {k: v for k, v in dataclasses.asdict(split).items() if v not in ("", [], None, 0, 0.0) and k != "kind"}
    if split.kind != "synthetic":
        own = {k: v for k, v in own.items() if k not in ("num_images", "seed")}
    return f"{split.kind} ({', '.join(f'{k}={v}' for k, v in own.items())})"


def _settings(cfg: Config) -> list[str]:
    """The adapt.* sections the run's method reads, as `key=value` lines."""
    adapt = cfg.adapt
    names = piece_sections(METHODS[adapt.method]) | set(regularisers_of(adapt)) | {k for _, k in tuning_of(adapt)}
    lines = []
    for name in sorted(n for n in names if n in SECTIONS):
        values = dataclasses.asdict(getattr(adapt, name))
        lines += [f"adapt.{name}.{k}={v}" for k, v in values.items()]
    return lines


def _scores(metrics: dict) -> list[str]:
    head = [k for k in ("mIoU", "aAcc", "dice", "iou", "mean_image_dice") if k in metrics]
    rows = [f"| {k} | {metrics[k]:.2f} |" for k in head]
    rows += [f"| IoU {name} | {v:.2f} |" for name, v in (metrics.get("per_class_iou") or {}).items()]
    return ["| metric (%) | value |", "|---|---|", *rows] if rows else ["not evaluated"]


def model_card(
    cfg: Config,
    meta: dict,
    *,
    metrics: dict | None,
    load_path: str,
    checkpoint: str,
    seconds: float | None = None,
    version: str = "",
) -> str:
    """The card's Markdown text for a model of `cfg` (its checkpoint `meta`), loaded from `load_path` (a folder the
    Python API loads) and `checkpoint` (what the CLI takes)."""
    b, d, a = cfg.model.backbone, cfg.data, cfg.adapt
    classes = meta.get("class_names") or d.class_names or [str(i) for i in range(d.num_classes)]
    adapted = bool(a.source_checkpoint)
    method = f"`{a.method}`: {METHODS[a.method].about}" if adapted else "supervised training (`tmtseg train`)"
    labelled = meta.get("num_labelled")
    took = f"{seconds / 60:.1f} min wall time" if seconds is not None else "wall time not recorded here"
    lines = [
        "---",
        "library_name: tmtseg",
        "pipeline_tag: image-segmentation",
        f"tags: [semantic-segmentation, domain-adaptation, {a.method if adapted else 'supervised'}]",
        "---",
        "",
        f"# {cfg.name}",
        "",
        f"A Mask2Former-style semantic segmenter (tmtseg) on a `{b.name}` backbone ({b.embed_dim} wide, {b.depth}"
        f" deep, {b.num_heads} heads, patch {b.patch_size}), initial weights"
        f" `{b.pretrained or 'random initialisation'}`; {len(classes)} classes: {', '.join(map(str, classes))}.",
        "",
        "## Data",
        "",
        f"- labelled (data.train): {_split(d.train)}, {labelled if labelled is not None else 'an unrecorded number of'}"
        " images",
        f"- source model: `{a.source_checkpoint}`"
        if adapted
        else "- source model: none (trained from its initial weights)",
        f"- unlabelled source images (data.source): {_split(d.source)}" if adapted else None,
        f"- validation (data.val): {_split(d.val)}",
        "",
        "## Method",
        "",
        f"{method}; {cfg.train.iters} steps, lr {cfg.train.lr}, batch {d.batch_size}, crop {d.crop_size}, seed"
        f" {cfg.train.seed}.",
        *(["", "```", *_settings(cfg), "```"] if adapted and _settings(cfg) else []),
        "",
        f"## Scores (data.val, step {meta.get('step', '?')}, inference `{cfg.infer.mode}`)",
        "",
        *_scores(metrics or {}),
        "",
        "## Training",
        "",
        f"{meta.get('step', cfg.train.iters)} steps, {took}, on `{cfg.train.device}`.",
        "",
        f"Software: tmtseg {version or '?'}, commit `{git_commit() or 'unknown'}`.",
        "",
        "## Use",
        "",
        "```python",
        "import tmtseg",
        f'model = tmtseg.load("{load_path}")',
        'labels = model.predict("image.png")  # [H, W] class ids',
        "```",
        "",
        "```bash",
        f"tmtseg predict {checkpoint} image.png --out predictions/",
        "```",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def write_model_card(folder: Path, cfg: Config, meta: dict, **how) -> Path:
    """Write `model_card(...)` to <folder>/README.md; return its path."""
    from tmtseg import __version__

    path = Path(folder) / CARD_FILE
    path.write_text(model_card(cfg, meta, version=__version__, **how))
    return path
