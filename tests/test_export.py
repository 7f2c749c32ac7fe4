"""ONNX export (issue 14 §1): a tiny segmenter exported once at one size and run with onnxruntime at others
(non-multiples of 32 among them): scores within 1e-4 of PyTorch, the same argmax; the CLI end to end (export, JSON,
predict --onnx == predict); refusals; issue 30's variants: the LayerScale-folded graph within the same tolerance,
--quantize int8 with an argmax agreement >= INT8_MIN_AGREEMENT with the fp32 model. An export takes most of a minute
on a shared 2-core CPU (torch.export's symbolic shapes, about the same for one layer or three), so the suite makes
one here and shares it: the CLI's export (with masks and int8) of one checkpoint that holds everything an export has
to carry, the msdeform pixel decoder (one encoder and one decoder layer), TMT's inference hooks (ACTE and TMA) and a
DINOv2-shaped ViT; the tests that follow read it. The fpn pixel decoder's export is the demo's (tests/test_smoke.py:
`tmtseg demo --quick` exports its fpn model through the same parity check, or fails)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tmtseg.modeling.inference import image_scores
from tmtseg.tools.export import ATOL, InferenceGraph, _session, check_parity, parity, smooth_images
from tmtseg.tools.ort import INT8_MIN_AGREEMENT

from .test_resume import cli
from .tiny import TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

SMALL = [*TINY, "model.backbone.depth=1", "adapt.acte.iters=1", "adapt.tma.lambda_init=1.0"]
SIZES = [(64, 96), (77, 45), (150, 97), (224, 224)]  # the export traces 100x140; 224: the position table as is
# a DINOv2-shaped ViT: patch 14 resized to one token per 8 px, LayerScale, a register token
DINO = ["model.backbone.patch_size=14", "model.backbone.token_stride=8", "model.backbone.layerscale=1e-5",
        "model.backbone.num_registers=1"]  # fmt: skip
# the msdeform pixel decoder and TMT, one deformable-encoder layer and one decoder layer
MSDEFORM_TMT = ["model.pixel_decoder=msdeform", "model.enc_layers=1", "model.dec_layers=1", "adapt.method=tmt",
                "adapt.preserve.weight=0"]  # fmt: skip


def test_cli_export_of_msdeform_tmt_and_a_dinov2_shaped_vit_matches_pytorch_at_other_sizes(checkpoint, exported):
    from tmtseg.engine.restore import model_with_loss_from_checkpoint

    assert exported["result"].returncode == 0, exported["result"].stderr
    trainer, _, _ = model_with_loss_from_checkpoint(checkpoint)
    assert trainer.method.inference_hooks()  # TMT's ACTE and TMA are in the graph
    x, scores = _matches_pytorch_at_other_sizes(trainer.eval(), exported["model"])
    # --quantize int8 (issue 30): the same file's linear layers as int8 MatMuls, the argmax kept on every size
    int8 = exported["model"].parent / "model.int8.onnx"
    record = json.loads(int8.with_suffix(".json").read_text())["quantization"]
    assert record["per_channel"] and record["op_types"] == ["MatMul"]
    assert record["parity_vs_fp32"]["min_argmax_agreement_seen"] >= INT8_MIN_AGREEMENT
    ops = [n.op_type for n in onnx.load(int8).graph.node]
    assert ops.count("MatMulInteger") >= 10 and "Gemm" not in ops  # every weight product quantised
    got = _session(int8).run(["scores"], {"image": x.numpy()})[0]
    assert 0 < np.abs(got - scores).max() < 0.1  # int8 differs from fp32, a little


def _matches_pytorch_at_other_sizes(trainer, model: Path) -> tuple:
    """The exported `model` (with masks) against `trainer` at SIZES, none of them the traced size; returns one input
    and its exported scores."""
    graph = InferenceGraph(model=trainer.model, method=trainer.method, with_masks=True).eval()
    session = _session(model)
    images = smooth_images(SIZES)
    checks = parity(graph, session, [(str(s), im) for s, im in zip(SIZES, images, strict=True)])
    check_parity(checks)
    assert max(c["max_abs_diff"] for c in checks) <= ATOL
    # the graph is the segmenter's own inference (padding, hooks, crop), and the masks come out too
    x = torch.from_numpy(images[1]).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        ref = image_scores(trainer.model, x, trainer.method.inference_hooks())
    scores, logits, masks = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(scores, ref.numpy(), atol=ATOL, rtol=0)
    assert logits.shape == (1, 6, 6) and masks.shape == (1, 6, 20, 12)  # Q = 6, K + 1 = 6, ceil(77/4) x ceil(45/4)
    # the batch dimension is dynamic: three frames in one call give each frame's own scores
    assert isinstance(session.get_inputs()[0].shape[0], str)
    three = torch.cat([x, x.flip(-1), 255 - x])  # [3, 3, 77, 45]
    batched = session.run(["scores"], {"image": three.numpy()})[0]
    for i in range(3):
        alone = session.run(["scores"], {"image": three[i : i + 1].numpy()})[0]
        np.testing.assert_allclose(batched[i : i + 1], alone, atol=ATOL, rtol=0)
    assert any(c.get("batch") == 2 for c in checks)  # and parity checks a batch too
    return x, scores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny TMT model's checkpoint (2 steps, trained without a source model: no preservation term) with the msdeform
    pixel decoder on a DINOv2-shaped ViT, with a LayerScale large enough for the export's fold to matter."""
    out = tmp_path_factory.mktemp("run")
    args = [*SMALL, *DINO, "data.train.num_images=2", "data.val.num_images=1", "train.iters=2", "train.warmup_iters=0"]
    args += ["model.backbone.layerscale=0.3", *MSDEFORM_TMT]
    result = cli("train", *args, f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out / "checkpoints" / "iter_0000002"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> dict:
    """`tmtseg export CHECKPOINT --with-masks --images DIR` once: the model file, the images, the command's result."""
    tmp = tmp_path_factory.mktemp("export")
    images = tmp / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(70, 90), (64, 64)]):
        Image.fromarray(smooth_images([(h, w)], seed=i)[0]).save(images / f"im{i}.png")
    model = tmp / "out" / "model.onnx"
    args = ["--images", str(images), "--with-masks", "--quantize", "int8"]
    result = cli("export", str(checkpoint), "--out", str(model), *args, timeout=900)
    return {"model": model, "images": images, "result": result}


def test_cli_export_then_predict_onnx_reproduces_predict(tmp_path, checkpoint, exported):
    images, model, result = exported["images"], exported["model"], exported["result"]
    assert result.returncode == 0, result.stderr
    assert "parity on 5 images and a batch of 2" in result.stdout and "model.int8.onnx" in result.stdout
    info = json.loads(model.with_suffix(".json").read_text())
    # the graph is the LayerScale-folded model (depth 1: two folds), checked against the checkpoint's model
    assert info["fusions"] == {"layerscale": 2} and info["variants"] == {"int8": "model.int8.onnx"}
    int8 = json.loads((model.parent / "model.int8.json").read_text())
    assert int8["fp32_model"] == "model.onnx" and int8["quantization"]["weights"].startswith("int8")
    assert int8["quantization"]["parity_vs_fp32"]["min_argmax_agreement_seen"] >= INT8_MIN_AGREEMENT
    assert int8["classes"] == info["classes"] and int8["input_size"] == info["input_size"]
    assert len(info["palette"]) == len(info["classes"]) == 5
    assert info["pixel_mean"] and info["pixel_std"] and info["opset"] == 18
    assert info["input_size"]["size_divisor"] == 32 and info["input_size"]["mode"] == "whole"
    import hashlib

    assert info["checkpoint_sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert info["parity"]["max_abs_diff"] <= ATOL and info["parity"]["min_argmax_agreement_seen"] >= 0.999
    assert [c["image"] for c in info["parity"]["checks"]][-3:-1] == ["im0.png", "im1.png"]
    assert info["parity"]["checks"][-1]["batch"] == 2

    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert cli("predict", str(checkpoint), str(images), "--out", str(torch_out)).returncode == 0
    result = cli("predict", "--onnx", str(model), str(images), "--out", str(onnx_out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in torch_out.iterdir())
    assert names == sorted(p.name for p in onnx_out.iterdir()) and len(names) == 4
    for name in names:
        a, b = np.asarray(Image.open(torch_out / name)), np.asarray(Image.open(onnx_out / name))
        same = (a == b).reshape(a.shape[0], a.shape[1], -1).all(-1)  # per pixel: id PNGs are [H, W], overlays RGB
        assert same.mean() >= 0.999, name
    # predict --onnx runs the int8 model from its own JSON: the same files, the ids within the int8 tolerance
    int8_out = tmp_path / "int8"
    result = cli("predict", "--onnx", str(model.parent / "model.int8.onnx"), str(images), "--out", str(int8_out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in int8_out.iterdir()) == names
    for name in ("im0.png", "im1.png"):
        a, b = np.asarray(Image.open(torch_out / name)), np.asarray(Image.open(int8_out / name))
        assert (a == b).mean() >= INT8_MIN_AGREEMENT, name


def test_export_stderr_has_only_our_lines_third_party_output_said_once_or_dropped(exported):
    """Issue 29: the exporter's optimiser logged bare "Skipping constant folding for op LayerNormalization with
    multiple outputs." lines (logging's last resort) among the tool's messages; every stderr line is now ours."""
    result = exported["result"]
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("tmtseg: ") for ln in lines), lines
    assert len(lines) == len(set(lines)) and "Skipping constant folding" not in result.stderr


def test_export_refuses_to_overwrite_an_input(tmp_path, checkpoint):
    weights = checkpoint / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, checkpoint):
        result = cli("export", str(checkpoint), "--out", str(out))
        assert result.returncode == 2 and "refusing to overwrite an input" in result.stderr, result.stderr
    assert weights.read_bytes() == before


def test_predict_onnx_errors_are_one_line(tmp_path):
    result = cli("predict", "--onnx", str(tmp_path / "missing.onnx"), str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("tmtseg: error: --onnx")
    assert "Traceback" not in result.stderr
