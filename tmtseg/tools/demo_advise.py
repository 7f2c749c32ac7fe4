"""The demo's advise step: between the source model and the adaptations, `tmtseg advise` (docs/advise.md) reads the
source model's view of the dusk pool and picks the images to label; the adaptations then train on those images only.
On real data this is where a user sends images to be labelled; the synthetic scenes come with their labels, so the
labels of the chosen images are simply kept and the others' dropped."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.tools.advise import advise
from tmtseg.tools.bench import BenchConfig
from tmtseg.tools.bench.plan import source_checkpoint


@dataclass
class DemoAdvice:
    folder: Path  # advise's output: advice.csv, chosen.txt, contact_sheet.png, labelled.yaml
    chosen: list[str]  # the chosen images' names, best first
    pool: int  # how many images it chose from
    files: Path  # the list the adaptations read (data.train.files): chosen.txt under a name that holds its content
    why: str  # one line: what the chosen images have that the others do not


def advise_labels(bench: BenchConfig, source_run: Path, out: Path, *, budget: int, strategy: str | None = None):
    """Advise `budget` of the target's `adapt` split (the dusk pool) with the source model in `source_run`, writing
    into `out`; returns a DemoAdvice. The pool is written as the config file a user would give `tmtseg advise`."""
    task = bench.tasks["synthetic"]
    split = task.domains["dusk"].adapt
    out.mkdir(parents=True, exist_ok=True)
    pool_file = out / "dusk_pool.yaml"
    pool_split = {k: v for k, v in dataclasses.asdict(split).items() if k != "files"}  # the whole pool, not a list
    pool_file.write_text(yaml.safe_dump({"data": {"train": pool_split}}, sort_keys=False))
    trainer, cfg, _ = model_with_loss_from_checkpoint(source_checkpoint(source_run))
    advice = advise(trainer, cfg, pool_file, out, budget=budget, strategy=strategy)
    chosen = [advice.names[i] for i in advice.chosen]
    # the run identities hash the list's path, not its content: a name that holds the content keeps a different
    # choice (another budget, another source model) from finding the runs trained on the old one
    text = (out / "chosen.txt").read_text()
    files = out / f"chosen-{hashlib.sha1(text.encode()).hexdigest()[:10]}.txt"
    files.write_text(text)
    return DemoAdvice(out, chosen, len(advice.names), files, _why(advice))


def _why(advice) -> str:
    """Mean U of the chosen images against the rest, and what the strategy adds."""
    u = np.asarray(advice.scores.u)
    picked = np.zeros(len(u), dtype=bool)
    picked[advice.chosen] = True
    rest = f"{u[~picked].mean():.3f} for the {int((~picked).sum())} left" if (~picked).any() else "none left"
    how = {
        "u+diversity": "the most uncertain first, then each time the one of largest U x distance (in ViT features) to "
        "those already chosen",
        "u": "the most uncertain",
        "typical": "the most typical image of each of K clusters of the pooled ViT features (TypiClust)",
        "balanced": "covering the classes the model predicts, rare ones sought as much as common ones",
    }.get(advice.strategy, f"strategy {advice.strategy}")
    return f"{how}: mean uncertainty U {u[picked].mean():.3f} on the chosen, {rest}"
