"""ONNX export of the msdeform pixel decoder with TMT (tests/test_export.py says what is checked, and why one export
per pixel decoder): apart from the CLI's fpn export, so that pytest-xdist's workers (whole modules each) run both at
once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config
from tmtseg.tools.export import InferenceGraph, _session, export_graph, smooth_images
from tmtseg.tools.ort import INT8_MIN_AGREEMENT, write_int8

from .test_export import SIZES, SMALL, _matches_pytorch_at_other_sizes

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


def test_export_of_msdeform_and_tmt_matches_pytorch_at_other_sizes(tmp_path):
    # one deformable-encoder layer and one decoder layer: the export's minutes go to symbolic shapes, per layer
    tiny = ["model.pixel_decoder=msdeform", "adapt.method=tmt", "model.enc_layers=1", "model.dec_layers=1"]
    cfg = load_config([], [*SMALL, *tiny])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg).eval()
    graph = InferenceGraph(model=trainer.model, method=trainer.method, with_masks=True).eval()
    export_graph(graph, tmp_path / "m.onnx", with_masks=True)
    x, scores = _matches_pytorch_at_other_sizes(trainer, tmp_path / "m.onnx")
    # --quantize int8 (issue 30): the same file's linear layers as int8 MatMuls, the argmax kept on every size
    named = [(str(s), im) for s, im in zip(SIZES, smooth_images(SIZES), strict=True)]
    record = write_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", named)
    assert record["per_channel"] and record["op_types"] == ["MatMul"]
    assert record["parity_vs_fp32"]["min_argmax_agreement_seen"] >= INT8_MIN_AGREEMENT
    ops = [n.op_type for n in onnx.load(tmp_path / "m.int8.onnx").graph.node]
    assert ops.count("MatMulInteger") >= 10 and "Gemm" not in ops  # every weight product quantised
    got = _session(tmp_path / "m.int8.onnx").run(["scores"], {"image": x.numpy()})[0]
    assert 0 < np.abs(got - scores).max() < 0.1  # int8 differs from fp32, a little
