"""Exact fusions for inference and export (issue 30): rewrites of a model's weights that compute the same function
with fewer operations. Only for a model that is run, never for one that trains or is saved: the rewritten
weights no longer have the checkpoint's keys and values."""

from __future__ import annotations

import torch
from torch import nn


def _plain_linear(layer: nn.Module) -> bool:
    """A linear layer whose output is its own: no forward hook adds to it (LoRA's low-rank branch is a hook) and none
    rewrites its input."""
    return isinstance(layer, nn.Linear) and not layer._forward_hooks and not layer._forward_pre_hooks


@torch.no_grad()
def fold_layerscale(model: nn.Module) -> int:
    """Fold every ViT block's LayerScale (x * gamma, DINOv2's) into the linear layer before it: gamma * (W x + b) =
    (gamma W) x + gamma b, so attn.proj's and mlp.fc2's rows and biases are scaled and ls1 / ls2 become identities.
    Exact up to float rounding (tests/test_deploy.py: scores within 1e-5); it saves two [B, N, C] multiplications per
    block and the ONNX graph's Mul nodes. A block whose proj or fc2 is not a plain linear layer (a LoRA hook on it)
    keeps that LayerScale. Returns how many LayerScales were folded (0 on a model folded already)."""
    folded = 0
    for block in model.modules():
        for scale, linear in (("ls1", ("attn", "proj")), ("ls2", ("mlp", "fc2"))):
            gamma = getattr(getattr(block, scale, None), "gamma", None)
            parent = getattr(block, linear[0], None)
            layer = getattr(parent, linear[1], None)
            if not isinstance(gamma, torch.Tensor) or not _plain_linear(layer) or gamma.shape != layer.weight.shape[:1]:
                continue
            layer.weight.mul_(gamma.to(layer.weight.dtype)[:, None])  # [C_out, C_in] rows; moves the version counter
            if layer.bias is not None:
                layer.bias.mul_(gamma.to(layer.bias.dtype))
            setattr(block, scale, nn.Identity())
            folded += 1
    return folded


def fuse_for_inference(model: nn.Module) -> dict[str, int]:
    """Every exact fusion of this module on `model`, in place: {fusion: how many places}."""
    return {"layerscale": fold_layerscale(model)}
