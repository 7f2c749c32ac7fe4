"""Runs: build everything from a Config, train (or adapt) with checkpoints and resume, evaluate a checkpoint."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import config as config_mod
from . import dist
from .checkpoint import latest_valid, load_checkpoint, load_train_state, load_weights, save_checkpoint
from .config import Config
from .data import build_dataset, check_config, collate
from .engine import LoopState, StopRequested, evaluate, log_jsonl, lr_factor, set_lr, train_batches, train_step
from .errors import CheckpointError, ConfigError, DataError, Preempted, TrainingError
from .methods import Trainer, build_trainer

# fields that may change when a run is resumed (they do not change what is computed)
_NO_DECAY = ("pos_embed", "cls_token", "query_feat", "query_embed", "level_embed")
_RESUMABLE_CHANGES = ("train.iters", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last")


def build_optimizer(cfg: Config, trainer: Trainer) -> torch.optim.Optimizer:
    """AdamW; the backbone's lr is scaled by train.backbone_lr_mult; no weight decay on norms, biases, embeddings."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in trainer.named_parameters():
        if not p.requires_grad:
            continue
        mult = cfg.train.backbone_lr_mult if name.startswith("model.backbone.") else 1.0
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
    trainer = build_trainer(cfg)
    load_weights(trainer, ckpt.weights, source=str(path))
    return trainer, cfg, ckpt.meta


def init_from_source(trainer: Trainer, path: str) -> None:
    """Load a source model's segmenter weights; the method's own modules start fresh."""
    ckpt = load_checkpoint(path)
    seg = {k[len("model.") :]: v for k, v in ckpt.weights.items() if k.startswith("model.")}
    if not seg:
        raise CheckpointError(f"{path}: holds no segmenter weights (model.*)")
    load_weights(trainer.model, seg, source=str(path))


def _check_data(cfg: Config, splits: tuple[str, ...]) -> None:
    problems = check_config(cfg, splits=splits)
    if problems:
        more = f" (and {len(problems) - 1} more; run `tmtseg data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def fit(cfg: Config, *, init_from: str = "", resume: bool = False, progress: bool = True) -> dict:
    """Train `cfg.adapt.method` on data.train (+ unlabelled data.source) for train.iters; return the final metrics."""
    device = dist.local_device(cfg.train.device)
    dist.init_distributed(device)
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)
    trainer = build_trainer(cfg)
    needs_source = trainer.method.needs_source or cfg.adapt.unsupervised
    _check_data(cfg, ("train", "val", "source") if needs_source else ("train", "val"))
    train_ds = build_dataset(cfg.data.train, cfg.data, train=True)
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    source_ds = build_dataset(cfg.data.source, cfg.data, train=True) if needs_source else None
    if init_from:
        init_from_source(trainer, init_from)
    trainer.to(device)
    optimizer = build_optimizer(cfg, trainer)
    state = LoopState()
    metrics_log = run_dir / "metrics.jsonl"
    if resume:
        ckpt = latest_valid(run_dir)
        if ckpt is None:
            raise CheckpointError(f"{run_dir}/checkpoints: --resume given but no readable checkpoint there")
        saved = load_checkpoint(ckpt)
        changed = [
            d
            for d in config_mod.diff(config_mod.config_from_dict(saved.meta["config"]), cfg)
            if not d.startswith(_RESUMABLE_CHANGES)
        ]
        if changed:
            raise ConfigError(f"{ckpt}: the config differs from the run being resumed: {'; '.join(changed)}")
        load_weights(trainer, saved.weights, source=str(ckpt))
        train_state = load_train_state(ckpt, optimizer)
        state = LoopState(step=train_state["step"], best=train_state["best"], history=train_state["history"])
        if metrics_log.exists() and dist.is_main():  # drop what the interrupted run logged after its checkpoint
            kept = [ln for ln in metrics_log.read_text().splitlines() if json.loads(ln).get("step", 0) <= state.step]
            metrics_log.write_text("".join(ln + "\n" for ln in kept))
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    model = trainer
    if dist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            trainer, device_ids=[device] if device.type == "cuda" else None
        )
    iters = {
        "target": train_batches(
            train_ds,
            batch_size=cfg.data.batch_size,
            seed=cfg.train.seed,
            start_step=state.step,
            num_workers=cfg.data.num_workers,
            collate=collate,
        ),
    }
    if source_ds is not None:
        iters["source"] = train_batches(
            source_ds,
            batch_size=cfg.data.batch_size,
            seed=cfg.train.seed + 1,
            start_step=state.step,
            num_workers=cfg.data.num_workers,
            collate=collate,
        )
    meta = checkpoint_meta(cfg, train_ds, method=cfg.adapt.method)

    def do_eval() -> dict:
        return evaluate(
            trainer.model,
            val_ds,
            mode=cfg.infer.mode,
            crop=tuple(cfg.data.crop_size),
            stride=tuple(cfg.infer.stride),
            device=device,
            binary=cfg.data.binary,
            hooks_fn=trainer.method.inference_hooks,
        )

    def save(step: int, name: str | None = None, metrics: dict | None = None) -> Path | None:
        if not dist.is_main():
            return None
        return save_checkpoint(
            run_dir,
            step=step,
            model=trainer,
            meta={**meta, "metrics": metrics or {}},
            optimizer=optimizer,
            train_state={"best": state.best, "history": state.history},
            name=name,
            keep_last=cfg.train.keep_last if name is None else 0,
        )

    last_good = latest_valid(run_dir) if dist.is_main() else None
    bar = tqdm(
        total=cfg.train.iters,
        initial=state.step,
        disable=not (progress and dist.is_main()),
        desc=cfg.name,
        dynamic_ncols=True,
    )
    tic, seen = time.perf_counter(), 0
    imgs_per_step = cfg.data.batch_size * (torch.distributed.get_world_size() if dist.is_distributed() else 1)
    with StopRequested() as stop:
        while state.step < cfg.train.iters:
            step = state.step
            set_lr(
                optimizer,
                lr_factor(step, iters=cfg.train.iters, warmup_iters=cfg.train.warmup_iters, power=cfg.train.poly_power),
            )
            batches = {k: next(it) for k, it in iters.items()}
            losses = train_step(
                model, optimizer, batches, step=step, grad_clip=cfg.train.grad_clip, amp=cfg.train.amp, device=device
            )
            state.step += 1
            seen += imgs_per_step
            if not math.isfinite(losses["loss"]):
                if cfg.train.nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite loss at step {step} ({losses['loss']});"
                        f" last good checkpoint: {last_good or 'none'}"
                    )
                if dist.is_main():
                    log_jsonl(metrics_log, {"step": state.step, "skipped": "non-finite loss"})
            elif state.step % cfg.train.log_every == 0 or state.step == cfg.train.iters:
                rate = seen / (time.perf_counter() - tic)
                lr = optimizer.param_groups[-1]["lr"]
                record = {
                    "step": state.step,
                    "lr": lr,
                    "imgs_per_s": rate,
                    **{k: v for k, v in losses.items() if not k.startswith("loss_") or k.count("_") == 1},
                }
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if dist.is_main():
                    log_jsonl(metrics_log, record)
                tic, seen = time.perf_counter(), 0
            bar.update(1)
            end = state.step == cfg.train.iters
            if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or end):
                result = do_eval()
                state.history.append({"step": state.step, "mIoU": result["mIoU"]})
                if dist.is_main():
                    log_jsonl(metrics_log, {"step": state.step, "eval": result})
                if result["mIoU"] > state.best:
                    state.best = result["mIoU"]
                    save(state.step, name="best", metrics=result)
            if end or state.step % cfg.train.save_every == 0 or stop.flag:
                last_good = save(state.step) or last_good
            if stop.flag and not end:
                raise Preempted(f"SIGTERM at step {state.step}: saved {last_good}; resume with --resume")
    bar.close()
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
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    metrics = evaluate(
        trainer.model,
        val_ds,
        mode=cfg.infer.mode,
        crop=tuple(cfg.data.crop_size),
        stride=tuple(cfg.infer.stride),
        device=device,
        binary=cfg.data.binary,
        hooks_fn=trainer.method.inference_hooks,
        progress=progress,
    )
    return metrics, cfg
