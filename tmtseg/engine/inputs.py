"""The inputs a run depends on and their content hashes (issue 29), recorded in every checkpoint's metadata (key
``inputs``), where `--resume` and `tmtseg eval` read them: a source checkpoint, pretrained weights or a data split that
changed under a run is refused (exit 2, one line naming it and both hashes) unless `--allow-changed-inputs` says to
go on, which the run then records (key ``changed_inputs``) and warns about.

What is hashed (sha256): the source checkpoint's and the pretrained weights' file bytes (a known weights name: its
cache record's hash, checked when the cache is read; a file that is gone is recorded as null); a data split: the
sorted list of (path relative to the split's common folder, size in bytes) of every image, label and field-of-view
file it lists, so a file added, removed, renamed or rewritten to another size changes it, while moving the whole
dataset does not (the synthetic scenes have no files: their names are hashed); with `label_regions`, each region
mask's bytes too."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from tmtseg.config import Config
from tmtseg.data.sources import list_source
from tmtseg.errors import ConfigError
from tmtseg.hashing import sha256_cached, sha256_text
from tmtseg.io.checkpoint import MODEL_FILE
from tmtseg.modeling.backbones import weights as weights_mod
from tmtseg.modeling.backbones.pretrained import KNOWN

ALLOW_FLAG = "--allow-changed-inputs"


def _file_input(path: Path) -> dict:
    file = path / MODEL_FILE if path.is_dir() else path
    return {"file": str(file), "sha256": sha256_cached(file) if file.is_file() else None}


def _pretrained_input(spec: str) -> dict:
    if spec in KNOWN:  # a cached file is checked against its record when read, so the record's hash is the file's
        path = weights_mod.cached(spec)
        record = path.with_suffix(".json") if path else None
        digest = json.loads(record.read_text())["sha256"] if record else None
        return {"file": str(path or spec), "sha256": digest}
    return _file_input(Path(spec).expanduser())


def split_input(cfg: Config, name: str) -> dict:
    """A data split's hash: the sorted (relative path, size) of its files; its config beside it, so that an eval
    pointed at another split (an override) is not compared with the recorded one."""
    split = getattr(cfg.data, name)
    source = list_source(split, cfg.data, key=f"data.{name}", check_classes=False)
    files = sorted({str(p) for r in source.records for p in (r.image, r.label, r.fov) if p is not None})
    if files:
        base = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        listed = [[os.path.relpath(f, base), os.path.getsize(f) if os.path.isfile(f) else -1] for f in files]
        what = f"{len(files)} files under {base}"
    else:
        listed, what = [r.name for r in source.records], source.where
    if split.label_regions:  # the region masks the labels are cut to: their content, as a rewritten mask keeps its size
        masks = Path(split.label_regions)
        listed = [listed, [[r.name, _mask_hash(masks / f"{r.name}.png")] for r in source.records]]
        if split.pseudo_labels:  # and the pseudo-labels around them
            fill = Path(split.pseudo_labels)
            listed.append([[r.name, _mask_hash(fill / f"{r.name}.png")] for r in source.records])
    return {"file": f"data.{name} ({what})", "sha256": sha256_text(json.dumps(listed)), "split": asdict(split)}


def _mask_hash(path: Path) -> str | None:
    return sha256_cached(path) if path.is_file() else None


def run_inputs(cfg: Config, splits: tuple[str, ...]) -> dict[str, dict]:
    """Every input of a run that starts now, by its config key: {"file": ..., "sha256": ...}."""
    inputs = {}
    if cfg.adapt.source_checkpoint:
        inputs["adapt.source_checkpoint"] = _file_input(Path(cfg.adapt.source_checkpoint))
    if cfg.model.backbone.pretrained:
        inputs["model.backbone.pretrained"] = _pretrained_input(cfg.model.backbone.pretrained)
    for name in splits:
        inputs[f"data.{name}"] = split_input(cfg, name)
    return inputs


def changed_inputs(recorded: dict | None, current: dict[str, dict]) -> list[dict]:
    """The inputs whose hash differs from the recorded one. Not compared: inputs the record does not hold (a
    checkpoint older than the record), inputs gone now (a resume does not read the pretrained weights again, nor a
    finetune's source model: they may be deleted; whatever still reads a file says so when it is missing), and a split
    whose config differs (another split, not a changed one)."""
    changes = []
    for key, now in current.items():
        then = (recorded or {}).get(key)
        if then is None or now["sha256"] is None or then.get("split", now.get("split")) != now.get("split"):
            continue
        if then["sha256"] is not None and then["sha256"] != now["sha256"]:
            changes.append({"input": key, "file": now["file"], "was": then["sha256"], "now": now["sha256"]})
    return changes


def refuse_changed(changes: list[dict], *, where: str, allow: bool) -> None:
    """One line naming the first changed input and both hashes (exit 2); with `allow`, a warning instead."""
    if not changes:
        return
    c = changes[0]
    more = f" (and {len(changes) - 1} more: {', '.join(x['input'] for x in changes[1:])})" if len(changes) > 1 else ""
    line = f"{c['file']}: {c['input']} changed since {where} (sha256 {c['was'][:12]} -> {c['now'][:12]}){more}"
    if not allow:
        raise ConfigError(f"{line}; pass {ALLOW_FLAG} to go on with the changed input")
    warnings.warn(f"{line}; going on ({ALLOW_FLAG}), recorded in the run", stacklevel=2)
