"""The inference paths speed_deploy.py times: each a function images uint8 [B, 3, H, W] -> something a user keeps
(class scores [B, K, H, W] for ours, HF's post-processed label maps for HF), built from one model."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn

OURS = ("eager", "bf16", "int8", "int8-bf16", "compile", "ort", "ort-int8")
HF = ("hf", "hf-bf16")
PATHS = OURS + HF
LABELS = {
    "eager": "PyTorch eager fp32",
    "bf16": "PyTorch eager bf16 (autocast)",
    "int8": "PyTorch eager, ViT linear layers int8",
    "int8-bf16": "PyTorch eager, ViT linear int8 + bf16",
    "compile": "torch.compile fp32 (inductor)",
    "ort": "ONNX Runtime fp32",
    "ort-int8": "ONNX Runtime int8 (dynamic MatMul)",
    "hf": "HF Mask2Former + Dinov2Backbone fp32",
    "hf-bf16": "HF Mask2Former + Dinov2Backbone bf16",
}


def load_model(args):
    """(trainer, cfg): the checkpoint's, or the config's with random weights (timing needs none)."""
    from speed_common import load_cfg

    from tmtseg.adapt.build import build_model_with_loss

    if args.checkpoint:
        from tmtseg.engine.restore import model_with_loss_from_checkpoint

        trainer, cfg, _ = model_with_loss_from_checkpoint(args.checkpoint, args.overrides)
    else:
        cfg = load_cfg(args.config, batch=1, size=[64, 64], overrides=args.overrides)
        torch.manual_seed(0)
        trainer = build_model_with_loss(cfg, pretrained=False)
    return trainer.eval().requires_grad_(False), cfg


def deployed(trainer) -> nn.Module:
    """The segmenter as deployment runs it: a copy with the exact fusions (tmtseg/modeling/fuse.py)."""
    from tmtseg.modeling.fuse import fuse_for_inference

    model = copy.deepcopy(trainer.model)
    fuse_for_inference(model)
    return model.eval()


def export_onnx(trainer, folder: Path) -> tuple[Path, Path]:
    """The deployed model exported as `tmtseg export` exports it, and its int8 variant (no agreement threshold here:
    the benchmark reports the agreement instead of refusing)."""
    from tmtseg.tools.export import InferenceGraph, export_graph
    from tmtseg.tools.ort import int8_path, quantize_int8

    fp32 = folder / "model.onnx"
    if not fp32.exists():
        graph = InferenceGraph(model=deployed(trainer), method=trainer.method).eval()
        export_graph(graph, fp32)
    if not int8_path(fp32).exists():
        quantize_int8(fp32, int8_path(fp32))
    return fp32, int8_path(fp32)


def ours(name: str, trainer, *, onnx_dir: Path, threads: int):
    """Our path `name` as images -> scores [B, K, H, W]."""
    from tmtseg.modeling.inference import image_scores

    if name.startswith("ort"):
        from tmtseg.tools.ort import session

        fp32, int8 = export_onnx(trainer, onnx_dir)
        sess = session(int8 if name == "ort-int8" else fp32, threads)

        def run_ort(x: Tensor) -> Tensor:
            return torch.from_numpy(sess.run(["scores"], {"image": x.float().numpy()})[0])  # [B, K, H, W]: B dynamic

        return run_ort
    model = deployed(trainer)
    if name.startswith("int8"):  # `tmtseg predict --precision int8`: the ViT's qkv, proj, fc1, fc2 in int8
        from tmtseg.modeling.quantize import quantize_vit_int8

        quantize_vit_int8(model)
    if name == "compile":
        model = torch.compile(model, dynamic=False)  # static shapes, as train.compile (engine/compiled.py)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name in ("bf16", "int8-bf16") else nullcontext

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        with amp():
            return image_scores(model, x, trainer.method.inference_hooks()).float()

    return run


def hf(name: str, cfg):
    """HF transformers' Mask2Former on its own Dinov2Backbone (benchmarks/speed_vs_hf.py's hf-dinov2: the image
    resized by patch / 16, the last layer's normed tokens through our simple feature pyramid), random weights, as a
    user runs it: normalise, forward, the image processor's semantic post-processing to label maps at input size."""
    from speed_vs_hf import HFDinov2Pyramid, dinov2_config, hf_config
    from transformers import Dinov2Backbone, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from transformers.models.mask2former import modeling_mask2former

    from tmtseg.modeling.backbones.vit import SimpleFeaturePyramid

    torch.manual_seed(0)
    b = cfg.model.backbone
    stride = b.token_stride or b.patch_size
    pyramid = SimpleFeaturePyramid(in_dim=b.embed_dim, out_dim=cfg.model.conv_dim, in_stride=stride)
    dinov2 = Dinov2Backbone(dinov2_config(cfg))
    adapter = HFDinov2Pyramid(dinov2, pyramid, patch=b.patch_size, token_stride=stride, channels=cfg.model.conv_dim)
    with mock.patch.object(modeling_mask2former, "load_backbone", lambda _config: adapter):
        config = hf_config(cfg, SimpleNamespace(hf_points="matched"), dinov2_config(cfg))
        model = Mask2FormerForUniversalSegmentation(config).eval().requires_grad_(False)
    processor = Mask2FormerImageProcessor()
    mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "hf-bf16" else nullcontext

    @torch.no_grad()
    def run(x: Tensor):
        H, W = x.shape[-2:]
        with amp():
            out = model(pixel_values=(x.float() - mean) / std)
        return processor.post_process_semantic_segmentation(out, target_sizes=[(H, W)] * x.shape[0])

    return run


def build(name: str, trainer, cfg, *, onnx_dir: Path, threads: int):
    return hf(name, cfg) if name in HF else ours(name, trainer, onnx_dir=onnx_dir, threads=threads)


def rss_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> bool:
    """The kernel's peak-RSS mark back to the current RSS (False where /proc/self/clear_refs is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
