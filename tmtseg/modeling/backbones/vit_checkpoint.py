"""Pretrained ViT weights into the backbone (docs/method.md §3): the checkpoint layouts a user brings (timm, HF
ViTModel, HF Dinov2Model with or without registers, DINOv2's own `dinov2_vits14_pretrain.pth`) renamed to timm's
names."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from tmtseg.errors import CheckpointError
from tmtseg.io.checkpoint import looks_like_pickle, refuse_finite, torch_load_weights
from tmtseg.modeling.backbones.vit import VisionTransformer, ViTBackbone, resample_patch_kernel, resize_pos_embed

# (pattern, replacement) on a key with the `module.` / `vit.` / `dinov2.` / `backbone.` prefix removed; first match wins
_RULES = [
    (r"embeddings\.cls_token$", "cls_token"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"embeddings\.register_tokens$", "reg_token"),  # HF Dinov2WithRegistersModel
    (r"register_tokens$", "reg_token"),  # DINOv2's own names
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),  # HF ViTModel
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),  # HF Dinov2Model
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.", "norm."),
    (r"blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # DINOv2's chunked (FSDP) layout: blocks.<chunk>.<index>.
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_IGNORED = ("head.", "pooler.", "classifier.", "fc_norm.", "mask_token", "embeddings.mask_token", "head_drop.")
_PREFIXES = ("module.", "vit.", "dinov2.", "backbone.")
# transformers >= 5 saves `layers.N.attention.{q,k,v,o}_proj` where hub files (and transformers 4) have
# `encoder.layer.N.attention.attention.{query,key,value}` and `attention.output.dense`: both are read
_HF5 = [
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.([qkv])_proj\."), lambda m: f".attention.attention.{_QKV[m.group(1)]}."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
]
_QKV = {"q": "query", "k": "key", "v": "value"}


def to_timm_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ViT state dict in any supported layout to timm names (timm names pass through)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(_IGNORED):
            continue
        for pattern, repl in _HF5:
            key = pattern.sub(repl, key)
        if m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _RULES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key, count=1)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"layer {layer}: {kind} of query/key/value incomplete (found {sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    for name in ("cls_token", "reg_token"):
        if out.get(name) is not None and out[name].ndim == 2:
            out[name] = out[name][None]  # [n, C] -> [1, n, C]
    return out


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a weights-only .pth/.pt/.bin (wrapped in model/state_dict/module or not)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if looks_like_pickle(path):  # say what it is, not "header too large"; never unpickled
            raise CheckpointError(f"{path}: refused: a pickle named .safetensors (a pickle can run code when loaded)")
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch_load_weights(path)
        for wrapper in ("model", "state_dict", "module", "teacher"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        return state
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or .pth)")


def fit_problems(own: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    """What keeps `state` from loading into a module whose state dict is `own`: every missing, unexpected or
    mis-shaped key, one 'kind: key' string each."""
    problems = [f"missing: {k}" for k in own if k not in state]
    problems += [f"unexpected: {k}" for k in state if k not in own]
    problems += [
        f"shape: {k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    return problems


def load_pretrained(model: VisionTransformer | ViTBackbone, path: str | Path) -> None:
    """Load ViT weights (any supported layout, .safetensors or .pth) into `model`: the position table is resized to
    the model's grid, and a patch kernel of another size is resampled FlexiViT-style.

    Raises CheckpointError listing every missing, unexpected or mis-shaped key; nothing is loaded then.
    """
    vit = model.vit if isinstance(model, ViTBackbone) else model
    path = Path(path)
    state = to_timm_names(read_state_dict(path))
    refuse_finite(state, path)
    own = vit.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.ndim == 3:
        if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
            # no class-token entry (timm's no_embed_class, e.g. DINOv2 with registers): the class token holds it
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        state["pos_embed"] = resize_pos_embed(pos, (vit.grid, vit.grid))
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4 and kernel.shape[:2] == own["patch_embed.proj.weight"].shape[:2]:
        state["patch_embed.proj.weight"] = resample_patch_kernel(kernel, vit.patch_size)
    problems = fit_problems(own, state)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise CheckpointError(f"{path}: does not fit the ViT ({len(problems)} problems): {shown}")
    vit.load_state_dict(state)
