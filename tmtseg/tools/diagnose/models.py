"""The checkpoints `tmtseg diagnose` compares, by role (tmt, source, tvt, finetune), checked to be of one task and
target split, and the TMA lambdas a run's checkpoints record."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from tmtseg.adapt.align import PatchAlignment, RegionAlignment
from tmtseg.adapt.build import ModelWithLoss
from tmtseg.config import Config
from tmtseg.errors import CheckpointError, ConfigError
from tmtseg.io.checkpoint import MODEL_FILE, list_checkpoints, load_checkpoint


@dataclass
class Model:
    path: Path
    trainer: ModelWithLoss
    cfg: Config


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder or file as `eval` takes it, or a run folder (then its checkpoints/best, else its newest
    iter_*)."""
    p = Path(path)
    if p.is_dir() and not (p / MODEL_FILE).exists():
        if (p / "checkpoints" / "best").exists():
            return p / "checkpoints" / "best"
        if list_checkpoints(p):
            return list_checkpoints(p)[-1]
    return p


def piece(model: Model, kind: type):
    """The model's method part (alignment or attention hook) of type `kind`, or None."""
    return next(
        (p for p in [*model.trainer.method.align, *model.trainer.method.attention] if isinstance(p, kind)), None
    )


def load_models(
    *, tmt: str, source: str | None = None, tvt: str | None = None, finetune: str | None = None, overrides=()
) -> tuple[dict[str, Model], Config]:
    """The models by role, and the config whose data.val is scored (the TMT checkpoint's, plus `overrides`).

    Raises CheckpointError for a checkpoint that lacks its role's piece (ACTE for --tmt, the patch discriminator for
    --tvt) or that belongs to another task or target split than the TMT checkpoint."""
    models = {"tmt": _load(tmt, overrides)}
    cfg = models["tmt"].cfg
    if piece(models["tmt"], RegionAlignment) is None:
        raise CheckpointError(
            f"{models['tmt'].path}: a {cfg.adapt.method} checkpoint without ACTE; --tmt needs a tmt one"
        )
    if source is None:
        if not cfg.adapt.source_checkpoint:
            raise ConfigError(
                f"{models['tmt'].path}: names no adapt.source_checkpoint; give the source model (--source)"
            )
        source = cfg.adapt.source_checkpoint
    elif cfg.adapt.source_checkpoint and Path(source).resolve() != Path(cfg.adapt.source_checkpoint).resolve():
        warnings.warn(f"--source {source}: the TMT model was adapted from {cfg.adapt.source_checkpoint}", stacklevel=2)
    models["source"] = _load(source)
    for role, path in (("tvt", tvt), ("finetune", finetune)):
        if path is not None:
            models[role] = _load(path)
    if "tvt" in models and piece(models["tvt"], PatchAlignment) is None:
        m = models["tvt"]
        raise CheckpointError(
            f"{m.path}: a {m.cfg.adapt.method} checkpoint without a patch discriminator; --tvt needs a tvt one"
        )
    _check_same_task(models, cfg)
    return models, cfg


def _load(path: str, extra=()) -> Model:
    # deferred, as it always was: importing diagnose (e.g. for its report) need not pull in the training engine
    from tmtseg.engine.restore import model_with_loss_from_checkpoint

    p = resolve_checkpoint(path)
    trainer, cfg, _ = model_with_loss_from_checkpoint(p, list(extra))
    return Model(path=p, trainer=trainer.eval(), cfg=cfg)


def _check_same_task(models: dict[str, Model], cfg: Config) -> None:
    """Every model scores the TMT model's classes at its scale; tvt and finetune were adapted on its target split."""
    for role, m in models.items():
        d, ref = m.cfg.data, cfg.data
        if (d.num_classes, d.ignore_index, d.scale) != (ref.num_classes, ref.ignore_index, ref.scale):
            raise CheckpointError(
                f"{m.path}: --{role} is of another task than --tmt (classes, ignore index, data.scale: "
                f"{d.num_classes}, {d.ignore_index}, {d.scale} vs {ref.num_classes}, {ref.ignore_index}, {ref.scale})"
            )
        if role in ("tvt", "finetune") and asdict(d.train) != asdict(ref.train):
            raise CheckpointError(f"{m.path}: --{role} was adapted on another target split (data.train) than --tmt")


def lambda_history(path: Path) -> list[dict]:
    """TMA's lambda per head at each checkpoint its run folder still holds (iter_* and best), by step."""
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    ckpts = [folder]
    if folder.parent.name == "checkpoints":
        ckpts = [*list_checkpoints(folder.parent.parent), *folder.parent.glob("best_iter_*")]
    steps = {}
    for ckpt in ckpts:
        c = load_checkpoint(ckpt)
        if "method.tma.lambdas" in c.weights:
            steps[int(c.meta.get("step", -1))] = c.weights["method.tma.lambdas"].tolist()
    return [{"step": s, "lambdas": steps[s]} for s in sorted(steps)]
