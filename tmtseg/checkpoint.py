"""Checkpoints that cannot be lost: safetensors only (nothing is ever unpickled), written atomically.

A checkpoint is a folder ``<run>/checkpoints/iter_0000100/`` holding ``model.safetensors`` (the weights, with the
resolved config and the metrics in its metadata) and ``train_state.safetensors`` (optimizer tensors and RNG state; the
optimizer's non-tensor state, step and scheduler state as JSON metadata). It is written to a temporary folder, every
file fsynced, then renamed: a kill during a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
_PREFIX = "iter_"


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict  # config, step, metrics, method


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"json": json.dumps(meta)})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["plain"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    meta: dict,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    name: str | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``checkpoints/<name or iter_step>`` atomically; then drop all but the newest ``keep_last`` iter folders."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / (name or f"{_PREFIX}{step:07d}")
    tmp = ckpt_root / f".tmp_{final.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {**meta, "step": step}
    _save(model.state_dict(), tmp / MODEL_FILE, meta)
    if optimizer is not None:
        tensors, optim_meta = _optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        _save(tensors, tmp / STATE_FILE, {"optimizer": optim_meta, **(train_state or {}), "step": step})
    _fsync_dir(tmp)
    old = None
    if final.exists():  # replacing "best": move the old one aside first, delete it only once the new one is in place
        old = ckpt_root / f".old_{final.name}_{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """iter_* folders, oldest first (temporary and half-written folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("json")
    if raw is None:
        raise CheckpointError(f"{path}: not a tmtseg checkpoint (no metadata)")
    return json.loads(raw)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load the weights of a checkpoint folder, or of a ``.safetensors`` file; errors name the file."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{file}: checkpoint not found")
    if file.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise CheckpointError(f"{file}: tmtseg checkpoints are safetensors; a pickle is never loaded here")
    try:
        weights = load_file(str(file))
        meta = read_meta(file)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    return Checkpoint(path=path, weights=weights, meta=meta)


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads; a truncated newer one is skipped with a warning naming it."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(ckpt)
            if (ckpt / STATE_FILE).exists():
                load_file(str(ckpt / STATE_FILE))
            return ckpt
        except (CheckpointError, SafetensorError, OSError) as err:
            warnings.warn(f"{ckpt}: skipped, unreadable ({err})", stacklevel=2)
    return None


def load_train_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and torch RNG state; return the JSON train state (step, scheduler, sampler, best...)."""
    file = Path(ckpt) / STATE_FILE
    try:
        tensors = load_file(str(file))
        meta = read_meta(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable training state ({err})") from None
    _restore_optimizer(optimizer, tensors, meta.pop("optimizer"))
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: str, strict: bool = True) -> list[str]:
    """Copy weights into the model; a misfit lists every mismatched key and shape in one CheckpointError."""
    own = model.state_dict()
    problems = []
    for key, value in weights.items():
        if key in own and own[key].shape != value.shape:
            problems.append(f"{key} {tuple(value.shape)} != model {tuple(own[key].shape)}")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if strict:
        problems += [f"{k} missing" for k in missing] + [f"{k} unexpected" for k in unexpected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: checkpoint does not fit the model: {shown}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return missing
