"""The training loop and evaluation: iteration-based, resumable to the exact sample, one code path for 1 or N."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from tmtseg import dist


# ---------------------------------------------------------------------------------------------------------------- data
def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at a global stream position: independent of workers and of resumes."""
    return (seed * 1_000_003 + position * 7919 + 12345) % (2**63 - 1)


class StepSampler:
    """Infinite batch sampler: step s of rank r takes global stream positions s*B*W + r*B + [0, B).

    Position p is sample perm_e[p % n] of epoch e = p // n, perm_e a permutation seeded by (seed, e). With W processes
    of batch B the data order equals one process of batch W*B; starting at `start_step` resumes the exact stream.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1009 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world + self.rank) * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            out.append((int(self._perm(p // self.n)[p % self.n]), sample_seed(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class SeededDataset(Dataset):
    """Wraps a training dataset so that each sample's augmentation is drawn from its own seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _ignore_sigterm(worker_id: int) -> None:  # noqa: ARG001
    """Data-loader workers ignore SIGTERM: a preemption signal sent to the whole process group must reach the loop
    (which finishes the step and saves), not kill the workers under it. Workers exit when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_batches(
    dataset: Dataset, *, batch_size: int, seed: int, start_step: int, num_workers: int, collate: Callable
) -> Iterator[dict]:
    """An infinite iterator of training batches for this rank, starting at `start_step`."""
    sampler = StepSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        rank=dist.rank(),
        world=dist.world_size(),
    )
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_sigterm,
        # iter() draws the workers' base seed from this generator; without it the draw would come from (and shift)
        # the global RNG, so a resumed run would not continue the uninterrupted run's random stream
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def close_batches(batches: Iterator[dict]) -> None:
    """Shut down the data-loader workers of a `train_batches` iterator now, not at interpreter exit.

    The workers ignore SIGTERM, and at exit multiprocessing stops them with SIGTERM and then waits for them: an error
    that left them running would hang the process. Asked here, each worker reads its stop sentinel and exits.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # DataLoader's own clean stop (absent for num_workers=0)
    if shutdown is not None:
        shutdown()


def step_seed(seed: int, step: int) -> int:
    """The global-RNG seed of a training step (criterion points, dropout): the same on every rank and after a resume.

    Reseeding per step makes each step's randomness a function of (seed, step) only, whatever ran before it
    (evaluation, checkpoint loading, data-loader start-up). Every rank draws the same stream, so batch-independent
    draws (the matcher's points) are the same as in one process with the whole batch.
    """
    return (seed * 1_000_033 + step * 104_729 + 7) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, *, iters: int, warmup_iters: int, power: float) -> float:
    """Linear warmup, then poly decay to 0 at `iters`."""
    if warmup_iters > 0 and step < warmup_iters:
        return (step + 1) / warmup_iters
    return (1 - min(step, iters) / max(iters, 1)) ** power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------------------- training
class StopRequested:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.flag = False
        self._previous = None

    def __enter__(self) -> StopRequested:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class LoopState:
    step: int = 0
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)  # periodic evaluations
    skipped: int = 0  # non-finite steps skipped (train.nonfinite=skip), over the whole run and its resumes


def amp_context(amp: str, device: torch.device) -> torch.autocast:
    """train.amp as a context: bf16 autocast on `device` for "bf16", a disabled autocast for "none"."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def precision_line(amp: str) -> str:
    """The one line predict and eval print: which precision the checkpoint infers at, and why it is that one."""
    name = "bfloat16 autocast" if amp == "bf16" else "float32"
    return f"inference precision: {name} (the checkpoint's train.amp={amp}, as in its training's evaluation)"


def train_step(
    trainer: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: dict[str, dict],
    *,
    step: int,
    grad_clip: float,
    amp: str,
    device: torch.device,
) -> tuple[dict[str, float], bool]:
    """One optimisation step -> (this rank's losses as floats, whether the step was taken).

    A non-finite loss (on any rank) or gradient norm skips the update on every rank, so the weights stay finite and
    the ranks stay in lockstep; the caller decides whether to stop.
    """
    moved = {
        k: {n: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for n, v in b.items()}
        for k, b in batches.items()
    }
    optimizer.zero_grad(set_to_none=True)
    with amp_context(amp, device):
        losses = trainer(moved, step=step)
    total = losses["loss"]
    if dist.any_rank(not bool(torch.isfinite(total.detach()))):
        return {k: float(v.detach()) for k, v in losses.items()}, False
    with record_function("tmtseg.backward"):  # the profile's parts (benchmarks/speed_step.py)
        total.backward()
    with record_function("tmtseg.optimizer"):
        # max_norm=inf scales by exactly 1: the norm is measured (and logged) even without clipping
        norm = torch.nn.utils.clip_grad_norm_(trainer.parameters(), grad_clip if grad_clip > 0 else math.inf)
        losses["grad_norm"] = norm
        if not torch.isfinite(norm):  # gradients are all-reduced: every rank sees the same norm
            optimizer.zero_grad(set_to_none=True)
            return {k: float(v.detach()) for k, v in losses.items()}, False
        optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}, True
