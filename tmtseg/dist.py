"""Distributed data parallel from torchrun's environment variables (the same code runs as one process), and the
launcher behind `tmtseg train --nproc N`."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

_joined = False  # this process has joined a process group of several (init_distributed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global _joined
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _joined = True
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op for one process); returns a new tensor on x's device (nccl reduces on the GPU)."""
    if not is_distributed():
        return x.clone()
    y = x.to(_comm_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / world_size()


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any process: decisions that change the control flow must be taken by all ranks."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def all_gather_lists(items: list) -> list[list]:
    """Every process's list, in rank order (a one-element list for one process)."""
    if not is_distributed():
        return [items]
    out: list = [None] * world_size()
    dist.all_gather_object(out, items)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(*, together: bool = True) -> None:
    """Leave the process group. `together`: every rank gets here (a finished run, or an error all ranks raised at the
    same step): wait for all first, since destroying a gloo group under a peer still using it can abort the process."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined a group of several processes at some point (then it leaves by `exit_process`)."""
    return _joined


def exit_process(code: int) -> NoReturn:
    """End a process that has left its process group (`cleanup`): flush, then exit without interpreter finalization.

    Why: destroy_process_group does not free a group that DistributedDataParallel has wrapped (torch keeps references
    to it; measured here, torch 2.13: after DDP, destroy and gc.collect(), gloo's three threads still run, and none
    without DDP). The group then dies during interpreter finalization, where a gloo thread that needs the GIL is
    stopped with pthread_exit, and the process now and then aborts ("terminate called without an active exception",
    SIGABRT) after a run that succeeded. Every file the run writes is closed by then; stdio and logging are flushed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    logging.shutdown()
    os._exit(code)


def local_device(preference: str) -> torch.device:
    """auto = this rank's GPU when there is one, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def launch_local(nproc: int, args: list[str], *, quiet: bool) -> int:
    """Run `python ARGS` in `nproc` processes under torch's elastic launcher, exactly as `torchrun --standalone
    --nproc-per-node N ARGS` would. Returns the first failing worker's exit code (torchrun itself exits 1), or
    128 + the signal that stopped the launcher (after the workers have shut down)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    parsed = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", *args])
    parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if quiet:  # the workers report their own errors; the launcher's log would repeat them
        for name in ("torch.distributed.elastic", "torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config, cmd, cmd_args = config_from_args(parsed)  # also sets OMP_NUM_THREADS=1 if unset, as torchrun does
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0
