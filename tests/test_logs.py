"""TensorBoard logs (issue 14 §2): a tiny TMT run with train.log_to=[jsonl, tensorboard], read back with tensorboard's
own reader: scalars (losses, lr, throughput, eval metrics) and pictures (overlays, transferability); a resume appends
without duplicating steps; a bad log_to is a config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmtseg.config import load_config
from tmtseg.engine.logs import TENSORBOARD_DIR
from tmtseg.engine.loop import fit
from tmtseg.errors import ConfigError

from .tiny import TINY

pytest.importorskip("tensorboard")


def _run(out: Path, iters: int, *, resume: bool = False) -> None:
    cfg = load_config(
        [],
        [
            *TINY,
            "data.train.num_images=4",
            "data.val.num_images=2",
            "data.source.num_images=4",
            "adapt.method=tmt",
            "adapt.preserve.weight=0",
            f"train.iters={iters}",
            "train.warmup_iters=0",
            "train.log_every=1",
            "train.eval_every=2",
            "train.save_every=2",
            "train.log_to=[jsonl,tensorboard]",
            f"output_dir={out}",
        ],
    )
    fit(cfg, resume=resume, progress=False)


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_pictures_then_resume_appends(tmp_path):
    run = tmp_path / "run"
    _run(run, 2)
    acc = _events(run)
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/imgs_per_s", "train/loss_adv", "val/mIoU"):
        assert tag in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert {"pictures/0/prediction", "pictures/0/transferability", "pictures/1/prediction"} <= set(tags["images"])
    image = acc.Images("pictures/0/prediction")[0]
    assert image.step == 2 and image.width > 0 and image.encoded_image_string.startswith(b"\x89PNG")
    # jsonl stays the source of truth: the same losses
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)

    _run(run, 4, resume=True)  # train.iters may change on a resume
    acc = _events(run)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [2, 4]


def test_unknown_log_target_is_a_config_error(tmp_path):
    cfg = load_config([], [*TINY, "train.log_to=[jsonl,wandb]", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.log_to"):
        fit(cfg, progress=False)
