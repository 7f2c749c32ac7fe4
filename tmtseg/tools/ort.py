"""onnxruntime for the exported models (issue 30): the inference session as deployment wants it, and int8 dynamic
quantisation of the linear layers, checked against the fp32 model it comes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tmtseg.errors import MissingExtra

QUANTIZATIONS = ("none", "int8")
# share of pixels whose argmax the int8 model keeps from the fp32 one, on every check image: a guard against a broken
# quantisation, not an accuracy promise (benchmarks/speed_deploy.py measures the mIoU it costs). Measured: the CamVid
# dusk fine-tuned DINOv2-S kept >= 94.8% on every parity image (3 synthetic, 3 real dusk frames; worst: synthetic)
INT8_MIN_AGREEMENT = 0.90
# MatMul only: the ViT's, the decoders' linear layers (nearly all the weights and FLOPs). ConvInteger (dynamic conv)
# has no fast CPU kernel in onnxruntime: quantised convolutions would slow the pyramid and the FPN down
INT8_OPS = ("MatMul",)
# one weight scale per output channel rather than per tensor: on tests/test_export.py's tiny model both keep every
# pixel's argmax, and per-channel's max |diff| of the scores was about half per-tensor's on two sizes of three
INT8_PER_CHANNEL = True


def require(*modules: str, extra: str = "export") -> None:
    """Import the optional packages of an extra, or raise MissingExtra naming what to install."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"needs {', '.join(missing)}: pip install 'tmtseg[{extra}]'")


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def session(path: Path, threads: int | None = None):
    """A CPU InferenceSession with every graph optimisation (ORT_ENABLE_ALL: constant folding, the fused attention,
    GELU and LayerNorm kernels, the fused MatMul + Add) and `threads` intra-op threads (default: every core this
    process may use; onnxruntime's own default counts the machine's physical cores, ignoring a CPU affinity)."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or cores()
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one graph branch at a time: the threads go to the ops
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def int8_path(path: Path) -> Path:
    """Where the int8 model of `path` goes: beside it, `model.onnx` -> `model.int8.onnx` (JSON: `model.int8.json`)."""
    return path.with_name(f"{path.stem}.int8{path.suffix or '.onnx'}")  # `model` -> `model.int8.onnx`: JSON apart


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = INT8_PER_CHANNEL) -> dict:
    """onnxruntime's dynamic quantisation of `src`'s MatMul weights to int8 (QInt8, symmetric), written to `dst`:
    the activations are quantised per call from their own range (uint8), so no calibration data is needed. Returns
    what the JSON records about it."""
    require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it logs advice (pre-process with shape inference) on the root logger; the dynamic quantisation of weight MatMuls
    # needs no shapes (tests/test_export.py checks that every weight product is quantised)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(INT8_OPS),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},  # weights only: attention's activation x activation stays float
            nodes_to_exclude=batched_weight_matmuls(src),
        )
    finally:
        root.setLevel(level)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8 (QInt8, symmetric)",
        "per_channel": per_channel,
        "activations": "uint8, quantised per call from their own range (dynamic)",
        "op_types": list(INT8_OPS),
        "onnxruntime_version": _ort_version(),
    }


def batched_weight_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose constant operand is not a matrix (a batched product with a [G, K, N] weight, as the
    deformable attention's and ACTE's grouped projections export): onnxruntime's int8 kernel takes per-channel
    parameters of a [K, N] weight only, and fails at run time on these, so they stay float."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            ranks[node.output[0]] = len(node.attribute[0].t.dims)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1], 2) != 2]


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def agreement(reference: np.ndarray, scores: np.ndarray) -> dict:
    """Scores [B, K, H, W] of a variant against its reference: the share of pixels with the same argmax and the
    largest |difference|."""
    same = float((reference.argmax(1) == scores.argmax(1)).mean())
    return {"argmax_agreement": same, "max_abs_diff": float(np.abs(reference - scores).max())}


def int8_parity(fp32: Path, int8: Path, images: list[tuple[str, np.ndarray]], threads: int | None = None) -> list[dict]:
    """The int8 model against the fp32 one it was made from, on each image (name, [H, W, 3] uint8): argmax agreement
    and max |diff| of the scores."""
    a, b = session(fp32, threads), session(int8, threads)
    checks = []
    for name, image in images:
        x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)  # [1, 3, H, W]
        ref, got = a.run(["scores"], {"image": x})[0], b.run(["scores"], {"image": x})[0]
        checks.append({"image": name, "size": list(image.shape[:2]), **agreement(ref, got)})
    return checks


def write_int8(fp32: Path, dst: Path, images: list[tuple[str, np.ndarray]], *, per_channel: bool = INT8_PER_CHANNEL):
    """Quantise `fp32` to `dst` and check it on `images`; below INT8_MIN_AGREEMENT on any image it raises
    ExportError (the caller writes nothing). Returns the JSON's `quantization` record."""
    from tmtseg.errors import ExportError

    record = quantize_int8(fp32, dst, per_channel=per_channel)
    checks = int8_parity(fp32, dst, images)
    worst = min(checks, key=lambda c: c["argmax_agreement"])
    if worst["argmax_agreement"] < INT8_MIN_AGREEMENT:
        raise ExportError(
            f"int8: argmax agreement with the fp32 model {100 * worst['argmax_agreement']:.2f}% on {worst['image']},"
            f" below {100 * INT8_MIN_AGREEMENT:g}%; nothing written (export without --quantize)"
        )
    return {
        **record,
        "parity_vs_fp32": {
            "min_argmax_agreement": INT8_MIN_AGREEMENT,
            "min_argmax_agreement_seen": worst["argmax_agreement"],
            "checks": checks,
        },
    }
