"""int8 inference of the ViT's linear layers in PyTorch eager (issue 30): the ViT is three quarters of a DINOv2-S
segmenter's CPU time, and its four linear layers per block (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) most of that.
Each becomes an `Int8Linear`: int8 weights with one scale per output channel, activations quantised per call from
their own range (dynamic: no calibration data), fbgemm's int8 GEMM (VNNI where the CPU has it), a float32 output.
Attention's own products, the LayerNorms, the patch embedding and everything after the ViT stay float.

Only for a model that is run, never for one that trains or is saved: the quantised layers hold packed weights, not
the checkpoint's parameters. Built on torch's quantized ops (`torch.ops.quantized.linear_dynamic`, what
torch.ao.quantization.quantize_dynamic swaps in) rather than quantize_dynamic itself, which takes exact nn.Linear
types only (ours are FrozenCastLinear) and is deprecated."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from tmtseg.errors import ConfigError

# the ViT block's linear layers that are quantised: (parent, child) under each block
INT8_LAYERS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))


def int8_engine() -> str:
    """The quantized engine this torch build runs int8 GEMMs with on this CPU ('x86' or 'fbgemm'); ConfigError
    naming what is missing on a build or CPU without one (e.g. an ARM build has only qnnpack)."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm"):
        if name in engines:
            return name
    raise ConfigError(f"precision int8 needs torch's x86/fbgemm quantized engine; this build has {engines}")


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 with VNNI (vpdpbusd accumulates in int32). Without it fbgemm's int8 kernel
    sums pairs of products in int16 and saturates on full-range activations, so they are then quantised to 7 bits
    (`reduce_range`), as torch's own dynamic quantisation always does."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (symmetric, one scale per output row) and x quantised per call to uint8 from its
    own min and max; accumulation in int32, output float32 (cast back to the input's dtype, for autocast)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, reduce_range: bool) -> None:
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()  # [out]
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors will go; its int8 GEMM needs one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(w, scale, zeros, axis=0, dtype=torch.qint8)
        b = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, b)
        self.in_features, self.out_features, self.reduce_range = w.shape[1], w.shape[0], reduce_range

    @classmethod
    def from_linear(cls, layer: nn.Linear, *, reduce_range: bool) -> Int8Linear:
        """The int8 layer of `layer`, with its forward hooks (a LoRA branch adds its float update to the output)."""
        new = cls(layer.weight, layer.bias, reduce_range=reduce_range)
        new._forward_hooks.update(layer._forward_hooks)
        new._forward_pre_hooks.update(layer._forward_pre_hooks)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, reduce_range=self.reduce_range)  # [.., out]
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8 per channel"


@torch.no_grad()
def quantize_vit_int8(model: nn.Module) -> int:
    """Swap, in place, every ViT block's qkv, proj, fc1 and fc2 (a module with those children: `model` may be the
    segmenter or its ViT) for Int8Linear; returns how many layers were swapped (0 on a model quantised already)."""
    engine = int8_engine()
    torch.backends.quantized.engine = engine
    reduce_range = not cpu_has_vnni()
    vit = getattr(getattr(model, "backbone", None), "vit", model)  # the decoders' layers stay float
    swapped = 0
    for block in list(vit.modules()):
        for parent_name, child in INT8_LAYERS:
            parent = getattr(block, parent_name, None)
            layer = getattr(parent, child, None)
            if isinstance(layer, nn.Linear):
                setattr(parent, child, Int8Linear.from_linear(layer, reduce_range=reduce_range))
                swapped += 1
    return swapped


def int8_copy(model: nn.Module) -> nn.Module:
    """A copy of the segmenter `model` for int8 inference on the CPU: its exact fusions (modeling/fuse.py), then its
    ViT's linear layers in int8; `model` itself is untouched. ConfigError for a model on another device."""
    import copy

    from tmtseg.modeling.fuse import fuse_for_inference

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(f"precision int8 runs on the CPU only; the model is on {device}")
    out = copy.deepcopy(model)
    fuse_for_inference(out)
    quantize_vit_int8(out)
    return out.eval()
