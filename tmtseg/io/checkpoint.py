"""Checkpoints that cannot be lost: safetensors only (nothing is ever unpickled), written atomically.

A checkpoint is a folder ``<run>/checkpoints/iter_0000100/`` holding ``model.safetensors`` (the weights, with the
resolved config and the metrics in its metadata) and ``train_state.safetensors`` (optimizer tensors and RNG state; the
optimizer's non-tensor state, step and scheduler state as JSON metadata). It is written to a temporary folder, every
file fsynced, then renamed: a kill during a save leaves the previous checkpoint whole. ``best`` is a symlink to the
folder ``best_iter_0000100``, switched atomically. Old folders are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tmtseg.errors import CheckpointError, TrainingError

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
SLOW_SAVE_ENV = "TMTSEG_TEST_SLOW_SAVE"
_PREFIX = "iter_"


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict  # config, step, metrics, method


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


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


def checkpoint_path(run_dir: Path, *, step: int, name: str | None = None) -> Path:
    """Where `save_checkpoint` puts the checkpoint of `step` (or the named one, e.g. ``best``)."""
    return Path(run_dir) / "checkpoints" / (name or f"{_PREFIX}{step:07d}")


def _test_pause(part: float) -> None:
    """Test hook: TMTSEG_TEST_SLOW_SAVE=<seconds> stretches every save, so tests can kill a process inside one."""
    seconds = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds * part)


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, first renamed out of sight: a kill mid-delete never leaves a partial one listed."""
    if not path.exists():
        return
    gone = path.parent / f".old_{path.name}_{os.getpid()}"
    shutil.rmtree(gone, ignore_errors=True)
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{what}: {key} holds NaN or inf; a non-finite checkpoint is never written")


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
    """Write ``checkpoints/iter_<step>`` (or the named checkpoint) atomically; then drop all but the newest
    ``keep_last`` iter folders. A named checkpoint is a folder ``<name>_iter_<step>`` and a symlink ``<name>`` to it,
    switched atomically, so the previous one stays loadable until the new one is whole."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for leftover in [*ckpt_root.glob(".tmp_*"), *ckpt_root.glob(".old_*")]:  # from saves killed mid-way
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    weights = model.state_dict()
    _check_finite(weights, f"checkpoint of step {step}")
    final = checkpoint_path(run_dir, step=step, name=f"{name}_{_PREFIX}{step:07d}" if name else None)
    tmp = ckpt_root / f".tmp_{final.name}_{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {**meta, "step": step}
        _save(weights, tmp / MODEL_FILE, meta)
        _test_pause(1 / 3)
        if optimizer is not None:
            tensors, optim_meta = _optimizer_tensors(optimizer)
            _check_finite(tensors, f"optimizer state of step {step}")
            tensors["rng.torch"] = torch.get_rng_state()
            _save(tensors, tmp / STATE_FILE, {"optimizer": optim_meta, **(train_state or {}), "step": step})
        _fsync_dir(tmp)
    except BaseException:  # e.g. a full disk: the half-written folder goes now, not at the next save
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _test_pause(1 / 3)
    _remove(final)  # the same step saved again (rare): the older copy goes only now that the new one is whole
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    _test_pause(1 / 3)
    if name:
        link, tmp_link = ckpt_root / name, ckpt_root / f".tmp_link_{name}_{os.getpid()}"
        os.symlink(final.name, tmp_link)  # relative: the run folder can move
        if link.is_dir() and not link.is_symlink():  # a real folder (e.g. copied with cp -L): cannot be replaced
            _remove(link)
        os.replace(tmp_link, link)  # atomic: `name` points at the old or at the new checkpoint, never at nothing
        _fsync_dir(ckpt_root)
        for stale in ckpt_root.glob(f"{name}_{_PREFIX}*"):
            if stale != final:
                _remove(stale)
        final = link
    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            _remove(stale)
    return final


def save_model_file(folder: Path, *, model: nn.Module, meta: dict) -> Path:
    """Write ``<folder>/model.safetensors`` (weights, `meta` as its metadata) through a temporary file and a rename,
    as a checkpoint's: a folder a model is saved to (``save_pretrained``) never holds a half-written one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict()
    _check_finite(weights, f"{folder / MODEL_FILE}")
    tmp = folder / f".tmp_{MODEL_FILE}_{os.getpid()}"
    try:
        _save(weights, tmp, meta)
        os.replace(tmp, folder / MODEL_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    return folder / MODEL_FILE


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


def looks_like_pickle(file: Path) -> bool:
    """A pickle (protocol 2+) or torch.save's zip of pickles, by the first bytes."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head == b"PK\x03\x04"


def _ends_like_pickle(file: Path) -> bool:
    """Protocol 0/1 pickles have no header, but every pickle ends with the STOP opcode '.'."""
    try:
        with open(file, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    except OSError:
        return False


def refuse_finite(weights: dict[str, torch.Tensor], file: Path) -> None:
    """A checkpoint whose weights hold NaN or inf scores and predicts garbage without any other sign: refused."""
    for key, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: weight {key} holds NaN or inf; refused (the model would predict garbage)")


def torch_load_weights(file: Path):
    """``torch.load`` of a ``.pth``-style file with ``weights_only=True``; every failure is a CheckpointError naming the
    file. A pickle that needs more than tensors and plain containers is refused as holding code: it is never loaded,
    and torch's advice to turn the protection off (``weights_only=False``) is never passed on."""
    import pickle

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = (found[0].split(". ")[0] if found else "") or "not tensors only"
        if "GLOBAL" not in detail and not looks_like_pickle(file) and not _ends_like_pickle(file):
            raise CheckpointError(
                f"{file}: not a readable torch checkpoint (neither a pickle nor a torch.save zip)"
            ) from None
        raise CheckpointError(
            f"{file}: refused: the pickle holds code or objects other than tensors ({detail}); a pickle can run code"
            " when loaded, so tmtseg never loads one like it (save the weights as .safetensors)"
        ) from None
    except Exception as err:  # zip, EOF, key and type errors of a damaged or foreign file
        reason = f"{type(err).__name__}: {_first_line(err)}" if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({reason})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load the weights of a checkpoint folder, or of a ``.safetensors`` file; errors name the file. Weights with a
    NaN or inf are refused."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{file}: checkpoint not found")
    if not file.is_file():
        raise CheckpointError(f"{file}: a folder where the checkpoint file should be")
    pickle_refused = (
        f"{file}: refused, a pickle (torch.save format) can run code when loaded; tmtseg checkpoints are safetensors"
        " and a pickle is never unpickled"
    )
    if file.suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise CheckpointError(pickle_refused)
    try:
        weights = load_file(str(file))
        meta = read_meta(file)
    except (SafetensorError, OSError, ValueError) as err:
        if looks_like_pickle(file):
            raise CheckpointError(pickle_refused) from None
        raise CheckpointError(f"{file}: unreadable checkpoint ({_first_line(err)})") from None
    refuse_finite(weights, file)
    return Checkpoint(path=path, weights=weights, meta=meta)


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint a run can resume from; a truncated or incomplete newer one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(ckpt)
            load_file(str(ckpt / STATE_FILE))
            read_meta(ckpt / STATE_FILE)
            return ckpt
        except (CheckpointError, SafetensorError, OSError, ValueError) as err:
            warnings.warn(f"{ckpt}: skipped, unreadable ({_first_line(err)}); trying the previous one", stacklevel=2)
    return None


def load_train_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and torch RNG state; return the JSON train state (step, scheduler, sampler, best...)."""
    file = Path(ckpt) / STATE_FILE
    try:
        tensors = load_file(str(file))
        meta = read_meta(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable training state ({_first_line(err)})") from None
    try:
        _restore_optimizer(optimizer, tensors, meta.pop("optimizer"))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: the optimizer state does not fit this model ({err})") from None
    return meta


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: str, strict: bool = True) -> list[str]:
    """Copy weights into the model; a misfit lists every mismatched key and shape (or kind of dtype) in one
    CheckpointError, raised before any tensor is copied."""
    own = model.state_dict()
    problems = []
    for key, value in weights.items():
        if key in own and own[key].shape != value.shape:
            problems.append(f"{key} {tuple(value.shape)} != model {tuple(own[key].shape)}")
        elif key in own and own[key].is_floating_point() != value.is_floating_point():  # copying would cast silently
            problems.append(f"{key} {value.dtype} != model {own[key].dtype}")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if strict:
        problems += [f"{k} missing" for k in missing] + [f"{k} unexpected" for k in unexpected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: checkpoint does not fit the model: {shown}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return missing
