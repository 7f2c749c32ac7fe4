"""Lying checkpoint metadata (issue 29): a checkpoint whose header (the config, class names and palette in its
metadata) names one architecture while its tensors hold another is refused by `tmtseg eval`, `tmtseg predict` and
`tmtseg.load` with exit 3 and one line naming the tensor that gives it away; a tensor that does not fit is refused
before any tensor is copied, so no half-loaded model exists. Tiny checkpoints crafted on disk (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tmtseg
from tmtseg.adapt.build import build_model_with_loss
from tmtseg.cli import main
from tmtseg.config import load_config, to_dict
from tmtseg.errors import CheckpointError
from tmtseg.io.checkpoint import load_weights
from tmtseg.io.pictures import default_palette

from .tiny import TINY

CFG = [*TINY, "model.backbone.depth=1", "data.val.num_images=1"]
FC1 = "model.backbone.vit.blocks.0.mlp.fc1.weight"


def _craft(folder: Path, *, config=None, meta=None, tensors=None) -> Path:
    """A true tiny checkpoint (32 wide, 1 block, 5 classes), then its header and tensors edited as asked."""
    cfg = load_config([], CFG)
    torch.manual_seed(0)
    weights = build_model_with_loss(cfg, pretrained=False).state_dict()
    header = {"config": to_dict(cfg), "class_names": list("abcde"), "palette": default_palette(5).tolist(), "step": 1}
    for dotted, value in (config or {}).items():  # e.g. {"model.backbone.embed_dim": 64}
        *path, last = dotted.split(".")
        node = header["config"]
        for part in path:
            node = node[part]
        node[last] = value
    header.update(meta or {})
    weights.update(tensors(weights) if tensors else {})
    folder.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"json": json.dumps(header)})
    return folder


# (case, how the checkpoint lies, what the one line must name)
LIES = [
    ("embed_dim", dict(config={"model.backbone.embed_dim": 64}), ["model.backbone.embed_dim=64", "vit.cls_token"]),
    ("depth", dict(config={"model.backbone.depth": 2}), ["model.backbone.depth=2", "vit.blocks.1.* is missing"]),
    (
        "more_blocks_stored",
        dict(
            tensors=lambda w: {
                k.replace("blocks.0.", "blocks.1."): v.clone() for k, v in w.items() if "vit.blocks.0." in k
            }
        ),
        ["depth=1", "vit.blocks.1.", "beyond"],
    ),
    ("class_names", dict(meta={"class_names": ["a", "b", "c"]}), ["class_names lists 3", "class_embed.weight"]),
    ("bad_config", dict(config={"model.backbone.num_heads": 3}), ["config in its metadata is invalid", "num_heads"]),
    ("dtype", dict(tensors=lambda w: {FC1: (w[FC1] * 100).long()}), [FC1, "torch.int64"]),
]


def _one_error(capsys, code: int) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("tmtseg: error: "), err
    assert code == 3, err
    return err[0]


@pytest.mark.parametrize("case,lie,named", LIES, ids=[c for c, _, _ in LIES])
def test_a_checkpoint_whose_header_lies_about_its_tensors_is_refused_by_eval_predict_and_load(
    tmp_path, capsys, case, lie, named
):
    ckpt = _craft(tmp_path / case, **lie)
    code = main(["--no-progress", "eval", str(ckpt), "--out", str(tmp_path / "eval.json")])
    line = _one_error(capsys, code)
    assert str(ckpt) in line and all(n in line for n in named), line
    assert not (tmp_path / "eval.json").exists()

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    code = main(["--no-progress", "predict", str(ckpt), str(image), "--out", str(tmp_path / "pred")])
    line = _one_error(capsys, code)
    assert all(n in line for n in named), line
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())

    with pytest.raises(CheckpointError) as err:
        tmtseg.load(ckpt)
    assert all(n in str(err.value) for n in named) and "\n" not in str(err.value)


def test_a_tensor_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    """Shapes and kinds of dtype are checked for every tensor before the first is copied: the good tensors of a
    refused checkpoint are not loaded either."""
    model = build_model_with_loss(load_config([], CFG), pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ({FC1: torch.zeros(127, 32)}, {FC1: torch.zeros(128, 32, dtype=torch.int64)}):
        weights = {k: torch.full_like(v, 7) if v.is_floating_point() else v for k, v in before.items()} | bad
        with pytest.raises(CheckpointError, match=FC1.replace(".", r"\.")):
            load_weights(model, weights, source="crafted")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
