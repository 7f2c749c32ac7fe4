"""A checkpoint's header (the config, class names and palette in its metadata) against its tensors, before a model is
built from the header (issue 29). A header that names one architecture while the tensors hold another (a ViT 384
wide whose tensors are 192 wide, 12 blocks named and 6 stored, 3 class names for a 5-class head) is refused as a bad
checkpoint (exit 3) with one line naming the tensor that gives it away; a header naming a huge model is refused before
that model is built. What these checks do not see, the shape check of every tensor against the built model catches
(`io.checkpoint.load_weights`), also before anything is copied: a refused checkpoint never leaves a half-loaded model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tmtseg.config import Config
from tmtseg.errors import CheckpointError

_VIT = "model.backbone.vit."
_BLOCK = re.compile(r"model\.backbone\.vit\.blocks\.(\d+)\.")
_CLASSES = "model.decoder.class_embed.weight"  # [K + 1, D]: the classes and "no object"


def refuse_lying_header(cfg: Config, meta: dict, weights: dict[str, torch.Tensor], file: Path) -> None:
    """Raise CheckpointError when the header's architecture or classes disagree with the tensors."""
    say = f"{file}: header and tensors disagree:"
    b = cfg.model.backbone
    width = weights.get(_VIT + "cls_token")  # [1, 1, C]
    if width is not None and width.shape[-1] != b.embed_dim:
        raise CheckpointError(
            f"{say} its config says model.backbone.embed_dim={b.embed_dim} but tensor {_VIT}cls_token"
            f" {tuple(width.shape)} is {width.shape[-1]} wide; refused"
        )
    blocks = sorted({int(m.group(1)) for k in weights if (m := _BLOCK.match(k))})
    if blocks and blocks != list(range(b.depth)):
        extra = [i for i in blocks if i >= b.depth]
        gone = [i for i in range(b.depth) if i not in blocks]
        tensor = (
            next(k for k in sorted(weights) if k.startswith(f"{_VIT}blocks.{extra[0]}.")) + " is beyond it"
            if extra
            else f"{_VIT}blocks.{gone[0]}.* is missing"
        )
        held = f"{len(blocks)} block{'s' * (len(blocks) != 1)}"
        raise CheckpointError(
            f"{say} its config says model.backbone.depth={b.depth} but the tensors hold {held}"
            f" (tensor {tensor}); refused"
        )
    head = weights.get(_CLASSES)
    if head is not None:
        for field in ("class_names", "palette"):
            if meta.get(field) is not None and len(meta[field]) != head.shape[0] - 1:
                raise CheckpointError(
                    f"{say} its {field} lists {len(meta[field])} classes but tensor {_CLASSES}"
                    f" {tuple(head.shape)} scores {head.shape[0] - 1} (and 'no object'); refused"
                )
