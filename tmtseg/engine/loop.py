"""The training loop (`fit`): build a run from its config, then step, log, evaluate and save until train.iters, with
exact resume. Under torchrun every process runs the same code (DDP); only rank 0 writes."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tmtseg import config as config_mod
from tmtseg import dist
from tmtseg.adapt.build import ModelWithLoss, build_model_with_loss
from tmtseg.config import Config
from tmtseg.data import build_dataset, collate
from tmtseg.engine.card import write_model_card
from tmtseg.engine.compiled import compile_model
from tmtseg.engine.evaluate import check_data, evaluate_model_with_loss
from tmtseg.engine.inputs import run_inputs
from tmtseg.engine.logs import TrainLog, read_jsonl
from tmtseg.engine.optim import build_optimizer, freeze
from tmtseg.engine.restore import attach_teacher, checkpoint_meta, init_from_source, resume_run
from tmtseg.engine.step import (
    LoopState,
    StopRequested,
    close_batches,
    lr_factor,
    set_lr,
    step_seed,
    train_batches,
    train_step,
)
from tmtseg.errors import ConfigError, Preempted, TmtsegError, TrainingError
from tmtseg.io.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from tmtseg.io.files import write_atomically
from tmtseg.io.runlock import RunLock
from tmtseg.losses.criterion import is_aux_loss


@dataclass
class Run:
    """Everything one training run holds while it steps."""

    cfg: Config
    device: torch.device
    run_dir: Path
    model_with_loss: ModelWithLoss
    model: torch.nn.Module  # model_with_loss, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    batches: dict  # role ("labelled", "unlabelled") -> an infinite batch iterator
    val_ds: object
    log: TrainLog
    meta: dict
    state: LoopState = field(default_factory=LoopState)
    last_good: Path | None = None
    tic: float = field(default_factory=time.perf_counter)  # throughput since the last logged step
    seen: int = 0
    started: float = field(default_factory=time.perf_counter)  # the card's wall time (of this process, if resumed)
    # (step, metrics) of the last evaluation of this process: the final one is not run again on the same weights
    evaluated: tuple[int, dict] | None = None


def fit(
    cfg: Config, *, init_from: str = "", resume: bool = False, progress: bool = True, allow_changed_inputs: bool = False
) -> dict:
    """Train `cfg.adapt.method` on data.train (+ unlabelled data.source) for train.iters; return the final metrics.
    A resume refuses inputs (source checkpoint, pretrained weights, data splits) whose content hash changed since
    the checkpoint was saved, unless `allow_changed_inputs` (then recorded in the run).

    The run folder is locked for the whole run (a second writer is refused at once), and whatever way the run ends,
    its data-loader workers are shut down before it returns or raises (they ignore SIGTERM, so nothing else would).
    The process group is left open for further runs in the same processes: call `tmtseg.dist.cleanup()` once at the
    end (the `tmtseg` command does), since a process that exits with a live gloo group can abort its peer.
    """
    device = dist.local_device(cfg.train.device)
    dist.init_distributed(device)
    run: Run | None = None
    # A dead worker is converted only once the ExitStack has shut the loaders down: torch says a death twice (the
    # loader's "exited unexpectedly", or a closed pipe, and its SIGCHLD handler's "is killed by signal", which
    # fires at any bytecode while the worker's pid is registered), and the second, raised during the clean-up, would
    # replace a line converted earlier. After the shutdown no pid is registered, so nothing can raise over it.
    try:
        with ExitStack() as cleanup:
            _lock_run_folder(Path(cfg.output_dir), cleanup)
            run = _start(cfg, device, cleanup, init_from=init_from, resume=resume, allow_changed=allow_changed_inputs)
            return _train(run, progress=progress)
    except RuntimeError as err:
        if run is None or "DataLoader worker" not in str(err):
            raise
        raise _worker_died(run, err) from None
    except (ConnectionResetError, EOFError) as err:  # the worker's pipe closed under the loader, before torch
        if run is None or not _from_data_loader(err):  # noticed the death: the same death, said the same way
            raise
        died = RuntimeError(f"DataLoader worker (pid unknown) exited unexpectedly ({type(err).__name__})")
        raise _worker_died(run, died) from None


def _from_data_loader(err: BaseException) -> bool:
    """Whether `err` was raised while the data loader read a batch from its workers (a frame of torch.utils.data)."""
    tb = err.__traceback__
    while tb is not None:
        if "torch/utils/data" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _worker_died(run: Run, err: RuntimeError) -> TmtsegError:
    """A data-loader worker that died (SIGKILL, most often the kernel's out-of-memory killer): torch raises a
    RuntimeError saying so (from its SIGCHLD handler, at any point of a step); one line naming the step and the
    checkpoint to resume from instead (exit 1)."""
    # torch words it two ways: "(pid 123) is killed by signal" from that handler, "(pid(s) 123) exited unexpectedly"
    # when the loader finds the worker gone first; one form for the line a user (and a script) reads
    reason = str(err).splitlines()[0].rstrip(".").replace("DataLoader worker (pid(s) ", "DataLoader worker (pid ", 1)
    return TmtsegError(
        f"{reason} at step {run.state.step + 1} (out of memory? fewer data.num_workers use less); last good"
        f" checkpoint: {run.last_good or 'none'}; continue with --resume"
    )


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


def _start(
    cfg: Config, device: torch.device, cleanup: ExitStack, *, init_from: str, resume: bool, allow_changed: bool
) -> Run:
    """Build the model, data, optimizer and log of a run; on --resume, restore them from the newest checkpoint."""
    run_dir = Path(cfg.output_dir)
    if not resume and (list_checkpoints(run_dir) or (run_dir / "checkpoints" / "best").exists()):
        raise ConfigError(
            f"{run_dir / 'checkpoints'}: holds checkpoints of an earlier run; pass --resume to continue it or set"
            " another output_dir"
        )
    torch.manual_seed(cfg.train.seed)
    model_with_loss = build_model_with_loss(cfg, pretrained=not (init_from or resume))  # a checkpoint replaces them
    freeze(cfg, model_with_loss)
    if init_from:  # a checkpoint that does not fit is refused before the data are scanned
        init_from_source(model_with_loss, init_from)
    needs_source = model_with_loss.method.needs_unlabelled or cfg.adapt.unsupervised
    splits = ("train", "val", "source") if needs_source else ("train", "val")
    check_data(cfg, splits)
    inputs = run_inputs(cfg, splits)  # content hashes, recorded in every checkpoint and checked by a resume
    train_ds = build_dataset(cfg.data.train, cfg.data, train=True)
    val_ds = build_dataset(cfg.data.val, cfg.data, train=False)
    source_ds = build_dataset(cfg.data.source, cfg.data, train=True) if needs_source else None
    model_with_loss.to(device)
    attach_teacher(cfg, model_with_loss, device)
    if cfg.train.compile:
        # the segmenter only, in place and before DDP wraps: compiling the DDP wrapper would pull the criterion and
        # the scipy matcher into the graph. The state dict keeps its keys, so checkpoints and resume are unchanged.
        compile_model(model_with_loss.model, backend=cfg.train.compile_backend)
    optimizer = build_optimizer(cfg, model_with_loss)
    state, last_good, moved = LoopState(), None, []
    if resume:
        state, last_good, moved = resume_run(cfg, run_dir, model_with_loss, optimizer, inputs=inputs,
                                             allow_changed_inputs=allow_changed)  # fmt: skip
    log = _open_log(cfg, run_dir, state, resume=resume)
    batches = _batch_streams(cfg, train_ds, source_ds, start_step=state.step)
    for it in batches.values():
        cleanup.callback(close_batches, it)
    return Run(
        cfg=cfg,
        device=device,
        run_dir=run_dir,
        model_with_loss=model_with_loss,
        model=_wrap_ddp(model_with_loss, device),
        optimizer=optimizer,
        batches=batches,
        val_ds=val_ds,
        log=log,
        meta=checkpoint_meta(
            cfg,
            train_ds,
            method=cfg.adapt.method,
            num_labelled=len(train_ds),
            inputs=inputs,
            **({"changed_inputs": moved} if moved else {}),
        ),
        state=state,
        last_good=last_good,
    )


def _open_log(cfg: Config, run_dir: Path, state: LoopState, *, resume: bool) -> TrainLog:
    """metrics.jsonl trimmed to the resumed step (or started afresh), and the resolved config beside it."""
    metrics_log = run_dir / "metrics.jsonl"
    if resume and metrics_log.exists() and dist.is_main():  # drop what the interrupted run logged after its checkpoint
        kept = "".join(ln + "\n" for ln in read_jsonl(metrics_log, upto_step=state.step))
        write_atomically(metrics_log, lambda tmp: tmp.write_text(kept))
    elif not resume and dist.is_main():  # a fresh start (perhaps after a kill before the first checkpoint)
        metrics_log.unlink(missing_ok=True)
    log = TrainLog(run_dir, log_to=cfg.train.log_to, start_step=state.step, resume=resume, main=dist.is_main())
    if dist.is_main():  # written only now: a refused resume leaves the run's config as it was
        text = config_mod.to_yaml(cfg)
        write_atomically(run_dir / "config.yaml", lambda tmp: tmp.write_text(text))
    return log


def _wrap_ddp(model_with_loss: ModelWithLoss, device: torch.device) -> torch.nn.Module:
    if not dist.is_distributed():
        return model_with_loss
    # static_graph: the parameters a config leaves out of the loss (e.g. a memory level that model.dec_layers < 3
    # never visits) are the same at every step, so DDP needs no per-step graph walk; frozen ones are not its to sync
    return torch.nn.parallel.DistributedDataParallel(
        model_with_loss, device_ids=[device] if device.type == "cuda" else None, static_graph=True
    )


def _batch_streams(cfg: Config, train_ds, source_ds, *, start_step: int) -> dict:
    """The infinite batch iterators by role; the unsupervised variant learns from the source labels (the streams
    keep their seeds whichever role they play)."""
    target_role, source_role = ("unlabelled", "labelled") if cfg.adapt.unsupervised else ("labelled", "unlabelled")
    common = dict(
        batch_size=cfg.data.batch_size, start_step=start_step, num_workers=cfg.data.num_workers, collate=collate
    )
    streams = {target_role: train_batches(train_ds, seed=cfg.train.seed, **common)}
    if source_ds is not None:
        streams[source_role] = train_batches(source_ds, seed=cfg.train.seed + 1, **common)
    return streams


def _train(run: Run, *, progress: bool) -> dict:
    """The loop: one step, its log line, an evaluation and a checkpoint when due; a SIGTERM saves and stops."""
    cfg = run.cfg
    bar = tqdm(
        total=cfg.train.iters,
        initial=run.state.step,
        disable=not (progress and dist.is_main()),
        desc=cfg.name,
        dynamic_ncols=True,
    )
    with StopRequested() as stop:
        while run.state.step < cfg.train.iters:
            losses, ok = _step(run)
            _log_step(run, losses, ok, bar)
            bar.update(1)
            end = run.state.step == cfg.train.iters
            if cfg.train.eval_every and (run.state.step % cfg.train.eval_every == 0 or end):
                _evaluate_and_keep_best(run)
            preempted = dist.any_rank(stop.flag)  # ranks may see the signal at different steps: agree on one
            if end or run.state.step % cfg.train.save_every == 0 or preempted:
                run.last_good = _save(run, run.state.step)
            if preempted and not end:
                raise Preempted(f"SIGTERM at step {run.state.step}: saved {run.last_good}; continue with --resume")
    bar.close()
    run.log.close()
    _refuse_too_many_skipped(run)
    final = run.evaluated[1] if run.evaluated and run.evaluated[0] == run.state.step else _evaluate(run)
    skipped = {"skipped_steps": run.state.skipped} if run.state.skipped else {}
    if dist.is_main():
        summary = {"step": run.state.step, "split": "val", **skipped, **final}
        text = json.dumps(summary, indent=1)  # whole or not at all: a kill here leaves the file as it was
        write_atomically(run.run_dir / "eval.json", lambda tmp: tmp.write_text(text))
        # the model card of the run: what `tmtseg eval` and tmtseg.load take is the run's best (or last) checkpoint
        best = run.run_dir / "checkpoints" / "best"
        ckpt = best if best.exists() else run.last_good
        seconds = time.perf_counter() - run.started
        meta = {**run.meta, "step": run.state.step}
        write_model_card(run.run_dir, cfg, meta, metrics=final, load_path=str(run.run_dir), checkpoint=str(ckpt),
                         seconds=seconds)  # fmt: skip
    return final


def _step(run: Run) -> tuple[dict, bool]:
    """One optimisation step at the scheduled lr, its randomness seeded by (seed, step) for an exact resume."""
    cfg, step = run.cfg, run.state.step
    set_lr(run.optimizer, lr_factor(step, iters=cfg.train.iters, warmup_iters=cfg.train.warmup_iters,
                                    power=cfg.train.poly_power))  # fmt: skip
    batches = {k: next(it) for k, it in run.batches.items()}
    torch.manual_seed(step_seed(cfg.train.seed, step))
    losses, ok = train_step(
        run.model, run.optimizer, batches, step=step, grad_clip=cfg.train.grad_clip, amp=cfg.train.amp,
        device=run.device,
    )  # fmt: skip
    run.state.step += 1
    run.seen += cfg.data.batch_size * dist.world_size()
    return losses, ok


def _log_step(run: Run, losses: dict, ok: bool, bar: tqdm) -> None:
    """A skipped (non-finite) step stops the run or is logged as skipped; a taken one is logged every log_every."""
    cfg, step = run.cfg, run.state.step
    if not ok:
        what = f"loss {losses['loss']}, grad norm {losses.get('grad_norm', 'not computed')}"
        if cfg.train.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss or gradient at step {step} ({what}); the step was not applied and nothing was"
                f" saved; last good checkpoint: {run.last_good or 'none'} (train.nonfinite=skip skips such steps)"
            )
        run.state.skipped += 1
        if dist.is_main():
            run.log.write({"step": step, "skipped": f"non-finite ({what})", "skipped_steps": run.state.skipped})
        return
    if step % cfg.train.log_every and step != cfg.train.iters:
        return
    rate = run.seen / (time.perf_counter() - run.tic)
    lr = run.optimizer.param_groups[-1]["lr"]
    shown = _mean_over_ranks({k: v for k, v in losses.items() if not is_aux_loss(k)})
    bar.set_postfix(loss=f"{shown['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
    if dist.is_main():
        skipped = {"skipped_steps": run.state.skipped} if run.state.skipped else {}
        run.log.write({"step": step, "lr": lr, "imgs_per_s": rate, **shown, **skipped})
    run.tic, run.seen = time.perf_counter(), 0


def _refuse_too_many_skipped(run: Run) -> None:
    """A run that skipped more than train.max_skipped_frac of its steps fails; its last checkpoint (just saved) stays,
    so a resume with a higher limit accepts it without training again."""
    skipped, steps, limit = run.state.skipped, run.state.step, run.cfg.train.max_skipped_frac
    if steps and skipped / steps > limit:
        raise TrainingError(
            f"{skipped} of {steps} steps were skipped as non-finite, more than train.max_skipped_frac={limit};"
            f" last good checkpoint: {run.last_good or 'none'}"
        )


def _evaluate(run: Run) -> dict:
    return evaluate_model_with_loss(run.model_with_loss, run.cfg, run.val_ds, run.device, progress=False)


def _evaluate_and_keep_best(run: Run) -> None:
    result = _evaluate(run)
    state = run.state
    run.evaluated = (state.step, dict(result))
    state.history.append({"step": state.step, "mIoU": result["mIoU"]})
    if dist.is_main():
        run.log.write({"step": state.step, "eval": result})
        run.log.pictures(state.step, run.model_with_loss, run.val_ds, device=run.device)
    if result["mIoU"] > state.best:
        state.best = result["mIoU"]
        _save(run, state.step, name="best", metrics=result)


def _save(run: Run, step: int, name: str | None = None, metrics: dict | None = None) -> Path:
    """Rank 0 writes; every rank waits for it and gets the path (so any rank can name it in a message)."""
    bad = _first_nonfinite(run.model_with_loss)
    if bad is not None:  # the same weights on every rank: all raise together
        raise TrainingError(
            f"non-finite weights ({bad}) after step {step}: not saved; last good checkpoint: {run.last_good or 'none'}"
        )
    path = checkpoint_path(run.run_dir, step=step, name=name)
    if dist.is_main():
        save_checkpoint(
            run.run_dir,
            step=step,
            model=run.model_with_loss,
            meta={**run.meta, "metrics": metrics or {}},
            optimizer=run.optimizer,
            train_state={"best": run.state.best, "history": run.state.history, "skipped": run.state.skipped},
            name=name,
            keep_last=run.cfg.train.keep_last if name is None else 0,
        )
    dist.barrier()
    return path


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Logged losses are the mean over processes (each rank's loss is already normalised by the global mask count)."""
    if not dist.is_distributed():
        return values
    keys = sorted(values)
    mean = dist.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, mean.tolist(), strict=True))


def _first_nonfinite(model_with_loss: ModelWithLoss) -> str | None:
    """The name of the first parameter or buffer holding a NaN or inf, or None."""
    for name, t in model_with_loss.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None
