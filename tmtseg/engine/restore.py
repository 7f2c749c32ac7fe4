"""Runs from checkpoints: what a checkpoint records, rebuilding its model, starting from a source model, the frozen
teacher of the regularisers, and resuming a run exactly where it stopped."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tmtseg import config as config_mod
from tmtseg import dist
from tmtseg.adapt.build import ModelWithLoss, build_model_with_loss
from tmtseg.adapt.registry import REGULARISERS
from tmtseg.config import Config
from tmtseg.engine.header import refuse_lying_header
from tmtseg.engine.inputs import changed_inputs, refuse_changed
from tmtseg.engine.step import LoopState
from tmtseg.errors import CheckpointError, ConfigError
from tmtseg.io.checkpoint import latest_valid, load_checkpoint, load_train_state, load_weights
from tmtseg.modeling.build import build_model

# config keys a resume may change: those that do not change what a run computes (config.RUN_NEUTRAL), what a
# non-finite loss does, how often it is evaluated; and train.iters, to extend a run (with a warning: the lr and GRL
# schedules follow it)
_RESUMABLE_CHANGES = config_mod.RUN_NEUTRAL | {"train.iters", "train.eval_every", "train.nonfinite"}


def checkpoint_meta(cfg: Config, dataset, **extra) -> dict:
    return {
        "config": config_mod.to_dict(cfg),
        "class_names": dataset.class_names,
        "palette": dataset.palette.tolist(),
        **extra,
    }


def model_with_loss_from_checkpoint(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[ModelWithLoss, Config, dict]:
    """Rebuild the trainer a checkpoint was saved from (its own config, plus overrides) and load its weights. The
    header (config, classes) must be valid and agree with the tensors, and every tensor must fit the built model
    before any is copied: a refusal is a CheckpointError naming the tensor."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt.meta:
        raise CheckpointError(f"{path}: no config in the checkpoint's metadata")
    try:
        cfg = config_mod.config_from_dict(ckpt.meta["config"])
    except ConfigError as err:  # the checkpoint is at fault, not the user's config
        raise CheckpointError(f"{path}: the config in its metadata is invalid ({err}); refused") from None
    refuse_lying_header(cfg, ckpt.meta, ckpt.weights, path)
    if overrides:
        cfg = config_mod.load_config_over(cfg, overrides)
    trainer = build_model_with_loss(cfg, pretrained=False)
    load_weights(trainer, ckpt.weights, source=str(path))
    return trainer, cfg, ckpt.meta


def init_from_source(trainer: ModelWithLoss, path: str) -> None:
    """Load a source model's segmenter weights; the method's own modules start fresh."""
    load_segmenter(trainer.model, path)


def load_segmenter(model: torch.nn.Module, path: str) -> None:
    """Load the segmenter weights (model.*) of a checkpoint into a segmenter."""
    ckpt = load_checkpoint(path)
    seg = {k[len("model.") :]: v for k, v in ckpt.weights.items() if k.startswith("model.")}
    if not seg:
        raise CheckpointError(f"{path}: holds no segmenter weights (model.*)")
    load_weights(model, seg, source=str(path))


def attach_teacher(cfg: Config, trainer: ModelWithLoss, device: torch.device) -> None:
    """The frozen source model that the regularisers (e.g. adapt.preserve, adapt.l2sp) compare against: loaded from
    adapt.source_checkpoint on a fresh start and on a resume alike, never saved with the run."""
    if not trainer.method.wants_teacher:
        return
    if not cfg.adapt.source_checkpoint:
        acting = [REGULARISERS[k].needs_key for k, r in trainer.method.regularisers.items() if r.needs_source]
        raise ConfigError(
            f"config key {acting[0]}: {cfg.adapt.method} with {' and '.join(acting)} needs the source model"
            " (adapt.source_checkpoint)"
        )
    teacher = build_model(cfg, pretrained=False)
    load_segmenter(teacher, cfg.adapt.source_checkpoint)
    trainer.method.set_teacher(teacher.to(device))


def resume_run(
    cfg: Config,
    run_dir: Path,
    trainer: ModelWithLoss,
    optimizer: torch.optim.Optimizer,
    *,
    inputs: dict,
    allow_changed_inputs: bool = False,
) -> tuple[LoopState, Path, list[dict]]:
    """Load the newest readable checkpoint of the run folder into trainer and optimizer; refuse a changed config, and
    changed inputs (their hashes, `inputs`, against the checkpoint's record) unless allowed. Returns the state, the
    checkpoint and the run's record of allowed input changes (earlier ones and this resume's, with the step)."""
    with warnings.catch_warnings():
        if not dist.is_main():  # one warning per run, not per process
            warnings.simplefilter("ignore")
        ckpt = latest_valid(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: --resume given but no readable checkpoint there")
    saved = load_checkpoint(ckpt)
    if "config" not in saved.meta:
        raise CheckpointError(f"{ckpt}: no config in the checkpoint's metadata")
    try:
        old = config_mod.config_from_dict(saved.meta["config"])
    except ConfigError as err:
        raise ConfigError(f"{ckpt}: the saved config does not load: {err}") from None
    changes = config_mod.diff(old, cfg)
    refused = [d for d in changes if d.split(":")[0] not in _RESUMABLE_CHANGES]
    if refused:
        raise ConfigError(f"{ckpt}: the config differs from the run being resumed: {'; '.join(refused)}")
    moved = changed_inputs(saved.meta.get("inputs"), inputs)
    with warnings.catch_warnings():
        if not dist.is_main():
            warnings.simplefilter("ignore")
        refuse_changed(moved, where=f"the run's checkpoint {ckpt.name} was saved", allow=allow_changed_inputs)
    if any(d.startswith("train.iters:") for d in changes) and dist.is_main():
        warnings.warn(f"{ckpt}: train.iters changed; the lr and GRL schedules follow the new length", stacklevel=2)
    load_weights(trainer, saved.weights, source=str(ckpt))
    train_state = load_train_state(ckpt, optimizer)
    # a checkpoint written before the skip count was kept has none: it reads as 0
    state = LoopState(step=train_state["step"], best=train_state["best"], history=train_state["history"],
                      skipped=int(train_state.get("skipped", 0)))  # fmt: skip
    record = [*saved.meta.get("changed_inputs", []), *({**c, "step": state.step} for c in moved)]
    return state, ckpt, record
