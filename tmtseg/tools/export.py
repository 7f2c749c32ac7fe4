"""ONNX export of a checkpoint's inference (segmenter + its method's inference hooks: ACTE and TMA for TMT) with
dynamic batch, height and width, checked against PyTorch with onnxruntime; and prediction with the exported file."""

from __future__ import annotations

import copy
import json
import operator
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg import __version__
from tmtseg.errors import ConfigError, ExportError, MissingExtra
from tmtseg.hashing import sha256
from tmtseg.modeling.inference import input_scores
from tmtseg.tools.library_output import library_output
from tmtseg.tools.onnx_decompose import decompose_for_onnx, exporter_takes_the_program_as_decomposed
from tmtseg.tools.ort import int8_path, require, session, write_int8

_session = session  # the name the tests and benchmarks know

OPSET = 18  # the first opset whose Resize has the antialias TMA's downsampling needs
ATOL = 1e-4  # max |onnxruntime - PyTorch| of the class scores, fp32
MIN_AGREEMENT = 0.999  # share of pixels with the same argmax
EXPORT_SIZE = (100, 140)  # (H, W) traced: not multiples of 32, so no size is specialised


class InferenceGraph(nn.Module):
    """What is exported: image [B, 3, H, W] float in 0-255 (RGB) -> scores [B, K, H, W] and, with masks, pred_logits
    [B, Q, K+1] and pred_masks [B, Q, ceil(H/4), ceil(W/4)]. The method's inference hooks are built per forward, as
    predict and eval build them; normalisation happens inside the segmenter, so inside the graph.

    The image is padded here (bottom/right, with the mean colour, which the segmenter's normalisation turns into the
    exact zeros it pads with itself) to a multiple of the size divisor, and the outputs are cropped as the segmenter
    crops them: the same numbers as the segmenter on the unpadded image. Padding first keeps every size inside the
    graph a multiple of one symbol (ceil(H/32)): nested floor/mod size expressions make torch.export's symbolic
    reasoning many times slower (minutes per TMT export)."""

    def __init__(self, *, model: nn.Module, method: nn.Module, with_masks: bool = False) -> None:
        super().__init__()
        self.model, self.method, self.with_masks = model, method, with_masks

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        from tmtseg.modeling.segmenter import SIZE_DIVISOR

        H, W = image.shape[-2:]
        d = getattr(self.model, "size_divisor", SIZE_DIVISOR)
        pad = (0, -(-W // d) * d - W, 0, -(-H // d) * d - H)
        inside = F.pad(torch.ones_like(image[:1, :1]), pad) > 0  # [1, 1, H', W']
        mean = self.model.pixel_mean.to(torch.float32)  # [1, 3, 1, 1]
        padded = torch.where(inside, F.pad(image.to(torch.float32), pad), mean)  # [B, 3, H', W']
        out = self.model(padded, hooks=self.method.inference_hooks())
        masks = out["pred_masks"][..., : -(-H // 4), : -(-W // 4)]  # [B, Q, ceil(H/4), ceil(W/4)]
        scores = input_scores({"pred_logits": out["pred_logits"], "pred_masks": masks}, image)  # [B, K, H, W]
        if self.with_masks:
            return scores, out["pred_logits"], masks
        return scores


def _floordiv(a, b):
    """Floor division of SymInts for any sign. torchlib maps `//` to ONNX Div, which truncates: right only for
    non-negative operands, while the segmenter's ceil-divisions are written -(-x // n). a - (a mod b) is an exact
    multiple of b, and ONNX Mod (fmod=0) takes the divisor's sign, as Python's % does."""
    from onnxscript import opset18 as op

    return op.Div(op.Sub(a, op.Mod(a, b)), b)


def smooth_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Image-like test inputs [H, W, 3] uint8: coarse random colours upsampled, plus a little noise (pure noise
    gives near-tied scores everywhere, which says little about the argmax agreement on real images)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g) * 255
        x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + 12 * torch.randn(1, 3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
        out.append(x[0].permute(1, 2, 0).numpy())
    return out


def parity(graph: nn.Module, session, images: list[tuple[str, np.ndarray]]) -> list[dict]:
    """onnxruntime vs PyTorch on each image (name, [H, W, 3] uint8), and on the first image with its mirror image as
    one batch of 2 (the batch dimension is dynamic too): max |diff| of the scores, argmax agreement."""
    checks = []
    for i, (name, image) in enumerate(images):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        checks.append({"image": name, "size": list(image.shape[:2]), **_compare(graph, session, x, name)})
        if i == len(images) - 1:
            first, x0 = images[0][0], torch.from_numpy(np.ascontiguousarray(images[0][1])).permute(2, 0, 1)[None]
            pair = torch.cat([x0, x0.flip(-1)]).float()  # [2, 3, H, W]
            both = _compare(graph, session, pair, f"a batch of 2 ({first})")
            checks.append({"image": first, "batch": 2, "size": list(images[0][1].shape[:2]), **both})
    return checks


def _compare(graph: nn.Module, session, x: Tensor, name: str) -> dict:
    """One input [B, 3, H, W] through both: max |diff| of the scores and the argmax agreement."""
    with torch.no_grad():
        ref = graph(x)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()  # [B, K, H, W]
    got = session.run(None, {"image": x.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportError(f"parity on {name}: onnxruntime gives scores {got.shape}, PyTorch {ref.shape}")
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
    }


def _refuse_overwrite(out: Path, inputs: list[Path]) -> None:
    """The export writes `out` and its JSON: neither may be an input (the checkpoint folder, its weights, an image)."""
    own = {p.resolve() for p in inputs} | {p.resolve() / "model.safetensors" for p in inputs if p.is_dir()}
    if out.suffix == ".json":
        raise ConfigError(f"--out {out}: the model file needs another suffix than .json (the JSON goes beside it)")
    for target in (out, out.with_suffix(".json")):
        if target.resolve() in own or target.is_dir():
            raise ConfigError(f"--out {out}: refusing to overwrite an input ({target}); choose another file")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    with_masks: bool = False,
    images: list[Path] | None = None,
    opset: int = OPSET,
    quantize: str = "none",
) -> dict:
    """Export a checkpoint to `out` (.onnx) and `out`.json; parity-check it first (raises ExportError past the
    tolerances, leaving nothing written). The exported graph is the model after its exact fusions
    (modeling/fuse.py), checked against the model as trained. quantize="int8" also writes `<out stem>.int8.onnx` and
    its JSON (tools/ort.py: dynamic int8 MatMuls, checked against the fp32 model). Returns the fp32 JSON's content."""
    from tmtseg.engine.restore import model_with_loss_from_checkpoint
    from tmtseg.modeling.fuse import fuse_for_inference
    from tmtseg.tools.predict import read_image

    require("onnx", "onnxscript", "onnxruntime")
    checkpoint, out = Path(checkpoint), Path(out)
    images = list(images or [])
    _refuse_overwrite(out, [checkpoint, *images])
    if quantize == "int8":
        _refuse_overwrite(int8_path(out), [checkpoint, *images])
    trainer, cfg, meta = model_with_loss_from_checkpoint(checkpoint, overrides)
    trainer.eval()
    graph = InferenceGraph(model=trainer.model, method=trainer.method, with_masks=with_masks).eval()
    fused = copy.deepcopy(trainer.model)
    fusions = fuse_for_inference(fused)
    exported = InferenceGraph(model=fused, method=trainer.method, with_masks=with_masks).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{os.getpid()}_{out.name}")
    int8 = None
    try:
        started = time.perf_counter()
        with library_output("onnx export"):  # the exporter's own log lines and C-level stderr, said once or dropped
            export_graph(exported, tmp, opset=opset, with_masks=with_masks)
            seconds = time.perf_counter() - started
            session = _session(tmp)
        tests = _parity_inputs(cfg, [(p.name, read_image(p)) for p in images])
        checks = parity(graph, session, tests)
        check_parity(checks)
        file = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
        info = describe(cfg, meta, file=file, opset=opset, with_masks=with_masks, checks=checks, seconds=seconds)
        info["fusions"] = fusions
        if quantize == "int8":
            int8 = write_int8(tmp, int8_path(tmp), tests)
            info["variants"] = {"int8": int8_path(out).name}
            os.replace(int8_path(tmp), int8_path(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        int8_path(tmp).unlink(missing_ok=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    if int8 is not None:
        record = {**info, "variants": {}, "fp32_model": out.name, "quantization": int8}
        int8_path(out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return info


def export_graph(graph: nn.Module, path: Path, *, opset: int = OPSET, with_masks: bool = False) -> None:
    """torch.onnx.export's dynamo exporter: torch.export traces sizes as symbols, so padding, the position-embedding
    resize, the deformable encoder's level shapes and ACTE's cell grid stay functions of the input size."""
    import logging
    import warnings

    example = torch.rand(2, 3, *EXPORT_SIZE) * 255  # a batch of 2: torch.export specialises a dimension of size 1
    dyn = torch.export.Dim.DYNAMIC
    names = ["scores", "pred_logits", "pred_masks"] if with_masks else ["scores"]
    quiet = logging.getLogger("torch.onnx")  # it logs a line per missing torchvision op it would register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # FakeTensor's dispatch cache off: with symbolic sizes its hit path rebuilds each output through set_ and the
    # sizes' sympy expressions, dearer than running the op's meta function again. The same graph, node for node; the
    # test suite's msdeform + TMT export took 60 s of CPU instead of 74 (torch.export 12 s instead of 22, the
    # decomposition 27 instead of 30; two runs each, alternated, idle machine)
    no_cache = torch._dynamo.config.patch(fake_tensor_cache_enabled=False)
    with warnings.catch_warnings(), no_cache:
        warnings.simplefilter("ignore")
        try:
            # captured here, not by torch.onnx.export: its capture turns on size-oblivious shape checks, under which a
            # transposed attention output is viewed instead of copied (a ValueError in the decoder's attention)
            program = torch.export.export(
                graph, (example,), dynamic_shapes={"image": {0: dyn, 2: dyn, 3: dyn}}, strict=False
            )
            program = decompose_for_onnx(program)
            with exporter_takes_the_program_as_decomposed():
                torch.onnx.export(
                    program,
                    (example,),
                    str(path),
                    dynamo=True,
                    input_names=["image"],
                    output_names=names,
                    opset_version=opset,
                    custom_translation_table={operator.floordiv: _floordiv},
                    external_data=False,  # one self-contained file (these models are far below ONNX's 2 GB limit)
                    verbose=False,
                )
        except Exception as err:  # the exporter's errors carry pages of diagnostics: keep the summary
            summary = str(err).split("## Exception summary")[-1].strip().splitlines()
            raise ExportError(f"torch.onnx.export failed: {' '.join(summary[:2])}") from err
        finally:
            quiet.setLevel(level)


def _parity_inputs(cfg, real: list[tuple[str, np.ndarray]], max_real: int = 3) -> list[tuple[str, np.ndarray]]:
    """Three synthetic sizes (one a multiple of 32, two not, none the traced size) and up to `max_real` real images,
    each resized by data.scale as prediction resizes it."""
    from tmtseg.tools.predict import rescale

    ch, cw = cfg.data.crop_size
    sizes = [(64, 96), (ch + 13, cw - 7), (max(33, ch // 2 + 5), cw + 37)]
    tests = [(f"synthetic {h}x{w}", im) for (h, w), im in zip(sizes, smooth_images(sizes), strict=True)]
    for name, image in real[:max_real]:
        x = rescale(torch.from_numpy(np.array(image)).permute(2, 0, 1), cfg.data.scale)  # [3, h, w]
        tests.append((name, x.permute(1, 2, 0).numpy()))
    return tests


def check_parity(checks: list[dict]) -> None:
    bad = [c for c in checks if not (c["max_abs_diff"] <= ATOL and c["argmax_agreement"] >= MIN_AGREEMENT)]
    if bad:
        shown = "; ".join(
            f"{c['image']} {c['size'][0]}x{c['size'][1]}: max |diff| {c['max_abs_diff']:.2e}, "
            f"argmax agreement {100 * c['argmax_agreement']:.3f}%"
            for c in bad
        )
        raise ExportError(
            f"onnxruntime differs from PyTorch beyond the tolerances (max |diff| <= {ATOL:g}, argmax agreement >= "
            f"{100 * MIN_AGREEMENT:g}%): {shown}; nothing written"
        )


def describe(cfg, meta: dict, *, file: Path, opset: int, with_masks: bool, checks: list[dict], seconds: float) -> dict:
    """The JSON written beside the model: what a deployment needs to feed it and read its output."""
    from tmtseg.io.pictures import default_palette
    from tmtseg.modeling.segmenter import SIZE_DIVISOR

    names = meta.get("class_names") or [str(i) for i in range(cfg.data.num_classes)]
    palette = meta.get("palette") or default_palette(cfg.data.num_classes).tolist()
    outputs = {"scores": "[B, K, H, W] float32: per-class scores at input resolution; the argmax is the prediction"}
    if with_masks:
        outputs["pred_logits"] = "[B, Q, K+1] float32: per-query class logits (the last class is 'no object')"
        outputs["pred_masks"] = "[B, Q, ceil(H/4), ceil(W/4)] float32: per-query mask logits at stride 4"
    return {
        "format": "tmtseg-onnx",
        "tmtseg_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "checkpoint": str(file),
        "checkpoint_sha256": sha256(file),
        "method": cfg.adapt.method,
        "classes": list(names),
        "palette": [list(map(int, c)) for c in palette],
        "ignore_index": cfg.data.ignore_index,
        "binary": cfg.data.binary,
        "pixel_mean": list(cfg.model.pixel_mean),
        "pixel_std": list(cfg.model.pixel_std),
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["B", 3, "H", "W"],
            "channels": "RGB",
            "range": [0, 255],
            "normalisation": "inside the graph: (image - pixel_mean) / pixel_std",
        },
        "input_size": {
            "height_width": "any (dynamic); padded inside the graph, bottom/right, to a multiple of size_divisor",
            "size_divisor": int(getattr(cfg.model, "size_divisor", SIZE_DIVISOR)),
            "scale": cfg.data.scale,
            "mode": cfg.infer.mode,
            "crop": list(cfg.data.crop_size),
            "stride": list(cfg.infer.stride),
            "how": "resize the image by scale (bilinear, antialias), run whole or in crop windows every stride, "
            "resize the scores back to the image",
        },
        "outputs": outputs,
        "export_seconds": round(seconds, 1),
        "parity": {
            "atol": ATOL,
            "min_argmax_agreement": MIN_AGREEMENT,
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),
            "min_argmax_agreement_seen": min(c["argmax_agreement"] for c in checks),
            "checks": checks,
        },
    }


class OnnxSegmenter:
    """An exported model and its JSON, run with onnxruntime: `scores(images uint8 [B, 3, h, w]) -> [B, K, h, w]`."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        path = Path(path)
        info = path.with_suffix(".json")
        if not path.is_file():
            raise ConfigError(f"--onnx {path}: file not found")
        if not info.is_file():
            raise ConfigError(f"{info}: not found (tmtseg export writes it beside the model)")
        self.info = json.loads(info.read_text())
        try:
            self.session = _session(path, threads)
        except MissingExtra:
            raise
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise ConfigError(f"--onnx {path}: not a loadable ONNX model ({str(err).splitlines()[0]})") from None

    def scores(self, images: Tensor) -> Tensor:
        x = images.float().numpy()
        return torch.from_numpy(self.session.run(["scores"], {"image": x})[0])

    def predict(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [H, W] class ids: `predict_array`'s path with the ONNX graph as the model."""
        from tmtseg.tools.predict import predict_array_with

        s = self.info["input_size"]
        crop, stride = tuple(s["crop"]), tuple(s["stride"])
        return predict_array_with(self.scores, image, scale=s["scale"], mode=s["mode"], crop=crop, stride=stride)


def predict_onnx(
    path: str | Path, inputs: Path, out_dir: Path, *, formats=("palette",), jsonl=False, progress=None
) -> int:
    """`tmtseg predict --onnx`: the same files as `predict_folder`, from the exported model (fp32, or int8 MatMuls)."""
    from tmtseg.tools.predict import Outputs, write_predictions

    model = OnnxSegmenter(path)
    palette = np.asarray(model.info["palette"], dtype=np.uint8)
    names = list(model.info.get("classes") or [str(i) for i in range(len(palette))])
    outputs = Outputs(palette, names, tuple(formats), binary=bool(model.info.get("binary")), jsonl=jsonl)
    s = model.info["input_size"]
    return write_predictions(
        model.scores,
        outputs,
        inputs,
        out_dir,
        scale=s["scale"],
        mode=s["mode"],
        crop=tuple(s["crop"]),
        stride=tuple(s["stride"]),
        progress=progress,
        protected=[Path(path), Path(path).with_suffix(".json")],
        note=print,
    )
