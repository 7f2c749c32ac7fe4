"""Runs: build everything from a Config, train (or adapt) with checkpoints and resume, evaluate a checkpoint."""

from __future__ import annotations

import json
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from . import config as config_mod
from . import dist
from .checkpoint import (
    checkpoint_path,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from .compiled import compile_model
from .config import Config
from .data import build_dataset, collate, data_report
from .engine import (
    LoopState,
    StopRequested,
    close_batches,
    evaluate,
    lr_factor,
    read_jsonl,
    set_lr,
    step_seed,
    train_batches,
    train_step,
)
from .errors import CheckpointError, ConfigError, DataError, Preempted, TrainingError
from .logs import TrainLog
from .methods import Trainer, build_trainer
from .models.feature_cache import FeatureCache
from .recipes import regularisers_of
from .runlock import RunLock

_NO_DECAY = ("pos_embed", "cls_token", "query_feat", "query_embed", "level_embed")
# config keys a resume may change: those that do not change what a run computes (config.RUN_NEUTRAL), what a
# non-finite loss does, how often it is evaluated; and train.iters, to extend a run (with a warning: the lr and GRL
# schedules follow it)
_RESUMABLE_CHANGES = config_mod.RUN_NEUTRAL | {"train.iters", "train.eval_every", "train.nonfinite"}


def lr_mult(cfg: Config, name: str) -> float:
    """The lr multiplier of a trainer parameter: the pretrained ViT's (backbone_lr_mult, times layer_decay to the
    power of its distance from the top), the adaptation method's fresh modules' (its discriminators start from
    scratch while the segmenter is only nudged), and TMA's lambda. The feature pyramid starts fresh: lr x 1."""
    if name.startswith("model.backbone.vit."):
        level = vit_depth_from_top(cfg.model.backbone.depth, name.removeprefix("model.backbone.vit."))
        return cfg.train.backbone_lr_mult * cfg.train.layer_decay**level
    if name == "method.tma.lambdas":
        return cfg.adapt.tma.lambda_lr_mult
    if name.startswith("method."):
        return cfg.adapt.head_lr_mult
    return 1.0


def vit_depth_from_top(depth: int, rest: str) -> int:
    """A ViT parameter's (name inside the ViT) distance from the top: 0 for the final norm, n - i for block i of n,
    n + 1 for the embeddings and prefix tokens (BEiT's layer decay)."""
    if rest.startswith("blocks."):
        return depth - int(rest.split(".")[1])
    return 0 if rest.startswith("norm.") else depth + 1


def freeze(cfg: Config, trainer: Trainer) -> None:
    """train.freeze_blocks: the patch embedding, position table, prefix tokens and the first N ViT blocks (-1: the
    whole ViT) get requires_grad False; the optimizer then skips them and DDP ignores them."""
    n = cfg.train.freeze_blocks
    if n == 0:
        return
    depth = cfg.model.backbone.depth
    for name, p in trainer.model.backbone.vit.named_parameters():
        level = vit_depth_from_top(depth, name)  # depth + 1 for the embeddings
        if n == -1 or depth - level < n:
            p.requires_grad_(False)


def build_optimizer(cfg: Config, trainer: Trainer) -> torch.optim.Optimizer:
    """AdamW with per-part lr multipliers (`lr_mult`); no weight decay on norms, biases, embeddings, lambda."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in trainer.named_parameters():
        if not p.requires_grad:
            continue
        mult = lr_mult(cfg, name)
        no_decay = p.ndim <= 1 or any(t in name for t in _NO_DECAY)
        groups.setdefault((mult, 0.0 if no_decay else cfg.train.weight_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": cfg.train.lr * m, "initial_lr": cfg.train.lr * m, "weight_decay": wd}
        for (m, wd), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr)


def checkpoint_meta(cfg: Config, dataset, **extra) -> dict:
    return {
        "config": config_mod.to_dict(cfg),
        "class_names": dataset.class_names,
        "palette": dataset.palette.tolist(),
        **extra,
    }


def trainer_from_checkpoint(path: str | Path, overrides: list[str] | None = None) -> tuple[Trainer, Config, dict]:
    """Rebuild the trainer a checkpoint was saved from (its own config, plus overrides) and load its weights."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt.meta:
        raise CheckpointError(f"{path}: no config in the checkpoint's metadata")
    cfg = config_mod.config_from_dict(ckpt.meta["config"])
    if overrides:
        cfg = config_mod.load_config_over(cfg, overrides)
    trainer = build_trainer(cfg, pretrained=False)
    load_weights(trainer, ckpt.weights, source=str(path))
    return trainer, cfg, ckpt.meta


def init_from_source(trainer: Trainer, path: str) -> None:
    """Load a source model's segmenter weights; the method's own modules start fresh."""
    load_segmenter(trainer.model, path)


def load_segmenter(model: torch.nn.Module, path: str) -> None:
    """Load the segmenter weights (model.*) of a checkpoint into a segmenter."""
    ckpt = load_checkpoint(path)
    seg = {k[len("model.") :]: v for k, v in ckpt.weights.items() if k.startswith("model.")}
    if not seg:
        raise CheckpointError(f"{path}: holds no segmenter weights (model.*)")
    load_weights(model, seg, source=str(path))


def attach_teacher(cfg: Config, trainer: Trainer, device: torch.device) -> None:
    """The frozen source model that the regularisers (adapt.preserve, adapt.l2sp) compare against: loaded from
    adapt.source_checkpoint on a fresh start and on a resume alike, never saved with the run."""
    if not trainer.method.wants_teacher:
        return
    if not cfg.adapt.source_checkpoint:
        keys = {"preserve": "adapt.preserve.weight", "l2sp": "adapt.l2sp"}
        acting = [keys[k] for k in regularisers_of(cfg.adapt)]
        raise ConfigError(
            f"config key {acting[0]}: {cfg.adapt.method} with {' and '.join(acting)} needs the source model"
            " (adapt.source_checkpoint)"
        )
    from .models.build import build_model

    teacher = build_model(cfg, pretrained=False)
    load_segmenter(teacher, cfg.adapt.source_checkpoint)
    trainer.method.set_teacher(teacher.to(device))


def _check_data(cfg: Config, splits: tuple[str, ...]) -> None:
    import multiprocessing

    report = data_report(cfg, splits=splits)
    if dist.is_main():  # what the model will learn from: each class's share per split, and any void warning
        if multiprocessing.parent_process() is None:  # not in a bench's worker: its output is the bench's progress
            print(report.table(), flush=True)
        for line in report.warnings:
            warnings.warn(line, stacklevel=2)
    problems = report.problems
    if problems:
        more = f" (and {len(problems) - 1} more; run `tmtseg data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def _resume(cfg: Config, run_dir: Path, trainer: Trainer, optimizer: torch.optim.Optimizer) -> tuple[LoopState, Path]:
    """Load the newest readable checkpoint of the run folder into trainer and optimizer; refuse a changed config."""
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
    if any(d.startswith("train.iters:") for d in changes) and dist.is_main():
        warnings.warn(f"{ckpt}: train.iters changed; the lr and GRL schedules follow the new length", stacklevel=2)
    load_weights(trainer, saved.weights, source=str(ckpt))
    train_state = load_train_state(ckpt, optimizer)
    return LoopState(step=train_state["step"], best=train_state["best"], history=train_state["history"]), ckpt


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Logged losses are the mean over processes (each rank's loss is already normalised by the global mask count)."""
    if not dist.is_distributed():
        return values
    keys = sorted(values)
    mean = dist.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, mean.tolist(), strict=True))


def _finite_weights(trainer: Trainer) -> str | None:
    """The first parameter or buffer holding a NaN or inf, or None."""
    for name, t in trainer.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def fit(cfg: Config, *, init_from: str = "", resume: bool = False, progress: bool = True) -> dict:
    """Train `cfg.adapt.method` on data.train (+ unlabelled data.source) for train.iters; return the final metrics.

    Under torchrun every process runs this same function (DDP, gloo on CPU, nccl on GPU); only rank 0 writes. The run
    folder is locked for the whole run (a second writer is refused at once), and whatever way the run ends, its
    data-loader workers are shut down before it returns or raises (they ignore SIGTERM, so nothing else would). The
    process group is left open for further runs in the same processes: call `tmtseg.dist.cleanup()` once at the end
    (the `tmtseg` command does), since a process that exits with a live gloo group can abort its peer.
    """
    device = dist.local_device(cfg.train.device)
    dist.init_distributed(device)
    with ExitStack() as cleanup:
        _lock_run_folder(Path(cfg.output_dir), cleanup)
        return _fit(cfg, device, cleanup, init_from=init_from, resume=resume, progress=progress)


def _lock_run_folder(run_dir: Path, cleanup: ExitStack) -> None:
    """Rank 0 takes the run folder's lock; every rank learns whether it got it, so all stop together if not."""
    refused = ""
    if dist.is_main():
        try:
            cleanup.enter_context(RunLock(run_dir))
        except ConfigError as err:
            refused = str(err)
    refused = dist.all_gather_lists([refused])[0][0]
    if refused:
        raise ConfigError(refused)


def _fit(cfg: Config, device: torch.device, cleanup: ExitStack, *, init_from: str, resume: bool, progress: bool):
    run_dir = Path(cfg.output_dir)
    if not resume and (list_checkpoints(run_dir) or (run_dir / "checkpoints" / "best").exists()):
        raise ConfigError(
            f"{run_dir / 'checkpoints'}: holds checkpoints of an earlier run; pass --resume to continue it or set"
            " another output_dir"
        )
    torch.manual_seed(cfg.train.seed)
    trainer = build_trainer(cfg, pretrained=not (init_from or resume))  # a checkpoint replaces the ViT's weights
    freeze(cfg, trainer)
    needs_source = trainer.method.needs_unlabelled or cfg.adapt.unsupervised
    _check_data(cfg, ("train", "val", "source") if needs_source else ("train", "val"))
    train_ds = build_dataset(cfg.data.train, cfg.data, train=True)
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    source_ds = build_dataset(cfg.data.source, cfg.data, train=True) if needs_source else None
    if init_from:
        init_from_source(trainer, init_from)
    trainer.to(device)
    attach_teacher(cfg, trainer, device)
    if cfg.train.compile:
        # the segmenter only, in place and before DDP wraps the trainer: compiling the DDP wrapper (PyTorch's advice,
        # so that its DDPOptimizer splits the graph at the gradient buckets) would pull the criterion and the scipy
        # matcher into the graph. The state dict keeps its keys, so checkpoints and resume are as without it.
        compile_model(trainer.model, backend=cfg.train.compile_backend)
    optimizer = build_optimizer(cfg, trainer)
    state, last_good = LoopState(), None
    metrics_log = run_dir / "metrics.jsonl"
    if resume:
        state, last_good = _resume(cfg, run_dir, trainer, optimizer)
        if metrics_log.exists() and dist.is_main():  # drop what the interrupted run logged after its checkpoint
            metrics_log.write_text("".join(ln + "\n" for ln in read_jsonl(metrics_log, upto_step=state.step)))
    elif dist.is_main():  # a fresh start (perhaps after a kill before the first checkpoint) logs from scratch
        metrics_log.unlink(missing_ok=True)
    log = TrainLog(run_dir, log_to=cfg.train.log_to, start_step=state.step, resume=resume, main=dist.is_main())
    if dist.is_main():  # written only now: a refused resume leaves the run's config as it was
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    model = trainer
    if dist.is_distributed():
        # static_graph: the parameters a config leaves out of the loss (e.g. the decoder's projection of a memory level
        # that model.dec_layers < 3 never visits) are the same at every step, and DDP then handles them without
        # find_unused_parameters' per-step graph walk; parameters with requires_grad=False (a frozen backbone) are
        # not DDP's to synchronise at all
        model = torch.nn.parallel.DistributedDataParallel(
            trainer, device_ids=[device] if device.type == "cuda" else None, static_graph=True
        )
    # the method reads batches by role; the unsupervised variant learns from the source labels (the streams keep
    # their seeds whichever role they play)
    target_role, source_role = ("unlabelled", "labelled") if cfg.adapt.unsupervised else ("labelled", "unlabelled")
    iters = {
        target_role: train_batches(
            train_ds,
            batch_size=cfg.data.batch_size,
            seed=cfg.train.seed,
            start_step=state.step,
            num_workers=cfg.data.num_workers,
            collate=collate,
        ),
    }
    if source_ds is not None:
        iters[source_role] = train_batches(
            source_ds,
            batch_size=cfg.data.batch_size,
            seed=cfg.train.seed + 1,
            start_step=state.step,
            num_workers=cfg.data.num_workers,
            collate=collate,
        )
    for it in iters.values():
        cleanup.callback(close_batches, it)
    meta = checkpoint_meta(cfg, train_ds, method=cfg.adapt.method)

    def do_eval() -> dict:
        return _evaluate(trainer, cfg, val_ds, device, progress=False)

    def save(step: int, name: str | None = None, metrics: dict | None = None) -> Path:
        """Rank 0 writes; every rank waits for it and gets the path (so any rank can name it in a message)."""
        bad = _finite_weights(trainer)
        if bad is not None:  # the same weights on every rank: all raise together
            raise TrainingError(
                f"non-finite weights ({bad}) after step {step}: not saved; last good checkpoint: {last_good or 'none'}"
            )
        path = checkpoint_path(run_dir, step=step, name=name)
        if dist.is_main():
            save_checkpoint(
                run_dir,
                step=step,
                model=trainer,
                meta={**meta, "metrics": metrics or {}},
                optimizer=optimizer,
                train_state={"best": state.best, "history": state.history},
                name=name,
                keep_last=cfg.train.keep_last if name is None else 0,
            )
        dist.barrier()
        return path

    bar = tqdm(
        total=cfg.train.iters,
        initial=state.step,
        disable=not (progress and dist.is_main()),
        desc=cfg.name,
        dynamic_ncols=True,
    )
    tic, seen = time.perf_counter(), 0
    imgs_per_step = cfg.data.batch_size * dist.world_size()
    with StopRequested() as stop:
        while state.step < cfg.train.iters:
            step = state.step
            set_lr(
                optimizer,
                lr_factor(step, iters=cfg.train.iters, warmup_iters=cfg.train.warmup_iters, power=cfg.train.poly_power),
            )
            batches = {k: next(it) for k, it in iters.items()}
            torch.manual_seed(step_seed(cfg.train.seed, step))
            losses, ok = train_step(
                model, optimizer, batches, step=step, grad_clip=cfg.train.grad_clip, amp=cfg.train.amp, device=device
            )
            state.step += 1
            seen += imgs_per_step
            if not ok:
                what = f"loss {losses['loss']}, grad norm {losses.get('grad_norm', 'not computed')}"
                if cfg.train.nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite loss or gradient at step {state.step} ({what}); the step was not applied and"
                        f" nothing was saved; last good checkpoint: {last_good or 'none'} (train.nonfinite=skip skips"
                        " such steps)"
                    )
                if dist.is_main():
                    log.write({"step": state.step, "skipped": f"non-finite ({what})"})
            elif state.step % cfg.train.log_every == 0 or state.step == cfg.train.iters:
                rate = seen / (time.perf_counter() - tic)
                lr = optimizer.param_groups[-1]["lr"]
                shown = _mean_over_ranks(
                    {k: v for k, v in losses.items() if not k.startswith("loss_") or k.count("_") == 1}
                )
                bar.set_postfix(loss=f"{shown['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if dist.is_main():
                    log.write({"step": state.step, "lr": lr, "imgs_per_s": rate, **shown})
                tic, seen = time.perf_counter(), 0
            bar.update(1)
            end = state.step == cfg.train.iters
            if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or end):
                result = do_eval()
                state.history.append({"step": state.step, "mIoU": result["mIoU"]})
                if dist.is_main():
                    log.write({"step": state.step, "eval": result})
                    log.pictures(state.step, trainer, val_ds, device=device)
                if result["mIoU"] > state.best:
                    state.best = result["mIoU"]
                    save(state.step, name="best", metrics=result)
            preempted = dist.any_rank(stop.flag)  # ranks may see the signal at different steps: agree on one
            if end or state.step % cfg.train.save_every == 0 or preempted:
                last_good = save(state.step)
            if preempted and not end:
                raise Preempted(f"SIGTERM at step {state.step}: saved {last_good}; continue with --resume")
    bar.close()
    log.close()
    final = do_eval()
    if dist.is_main():
        (run_dir / "eval.json").write_text(json.dumps({"step": state.step, "split": "val", **final}, indent=1))
    return final


def evaluate_checkpoint(path: str, *, overrides: list[str] | None = None, progress: bool = True) -> tuple[dict, Config]:
    """Score a checkpoint on its config's data.val (overrides may point it at another split or data root)."""
    trainer, cfg, _ = trainer_from_checkpoint(path, overrides)
    _check_data(cfg, ("val",))
    device = dist.local_device(cfg.train.device)
    trainer.to(device)
    if cfg.train.compile:
        compile_model(trainer.model, backend=cfg.train.compile_backend)
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    return _evaluate(trainer, cfg, val_ds, device, progress=progress), cfg


def _evaluate(trainer: Trainer, cfg: Config, dataset, device, *, progress: bool) -> dict:
    """Score the model on `dataset` as `cfg` infers (mode, crop, stride; the TMA hooks if the method has them; the
    ViT's outputs from infer.feature_cache if set)."""
    backbone = trainer.model.backbone
    if cfg.infer.feature_cache and getattr(backbone, "feature_cache", False) is None:
        backbone.feature_cache = FeatureCache(cfg.infer.feature_cache)
    # the method's pieces that run at inference (TVT's discriminators, whose T biases attention) in eval mode too:
    # their dropout would make the scores random (`evaluate` switches the segmenter only)
    was_training = trainer.method.training
    trainer.method.eval()
    try:
        return evaluate(
            trainer.model,
            dataset,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            device=device,
            binary=cfg.data.binary,
            hooks_fn=trainer.method.inference_hooks,
            progress=progress,
            amp=cfg.train.amp,
        )
    finally:
        trainer.method.train(was_training)
