"""The backbone (method.md §3): a plain ViT with timm's parameter names, its pretrained-weight loader (timm or HF
layout) and ViTDet's simple feature pyramid to strides 4/8/16/32."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import looks_like_pickle, refuse_finite, torch_load_weights
from ..errors import CheckpointError
from .layers import DropPath, LayerNorm2d

# hook(tokens [B, N, C], (h, w)) -> additive per-key bias [B, 1 or heads, N] or None
BackboneHook = Callable[[Tensor, tuple[int, int]], Tensor | None]


class ViTAttention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, h, N, C/h]
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # [B, h, N, C/h]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class ViTMlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; `bias` [B, 1 or h, 1, N] is added to every query's attention logits."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # [B, 3, H, W] -> [B, C, H/p, W/p]


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """Bicubic resize of a [1, prefix + g*g, C] position table to `grid`; prefix (class) entries kept as they are."""
    prefix, table = pos[:, :num_prefix], pos[:, num_prefix:]
    g = math.isqrt(table.shape[1])
    if (g, g) == tuple(grid):
        return pos
    table = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
    table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)  # [1, C, h, w]
    return torch.cat([prefix, table.flatten(2).transpose(1, 2)], dim=1)  # [1, prefix + h*w, C]


class VisionTransformer(nn.Module):
    """Plain ViT with a class token; parameter names as timm's VisionTransformer (minus the head)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, *, attn_hook: BackboneHook | None = None) -> tuple[Tensor, tuple[int, int]]:
        """x [B, 3, H, W] normalised, H and W multiples of the patch -> (patch tokens after norm [B, N, C], (h, w))."""
        x = self.patch_embed(x)  # [B, C, h, w]
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, C]
        x = x + resize_pos_embed(self.pos_embed, hw)
        for i, block in enumerate(self.blocks):
            bias = None
            if attn_hook is not None and i == len(self.blocks) - 1:
                bias = attn_hook(x[:, 1:], hw)  # [B, 1 or h, N]
                if bias is not None:
                    # the class-token key gets no bias; one bias row is shared by every query
                    bias = F.pad(bias, (1, 0)).to(x.dtype)[:, :, None, :]  # [B, 1 or h, 1, 1+N]
            x = block(x, bias)
        return self.norm(x)[:, 1:], hw  # [B, N, C]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: the last ViT map, resampled by transposed convs / max-pooling to each stride."""

    def __init__(self, *, in_dim: int, out_dim: int, patch_size: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.strides = strides
        self.stages = nn.ModuleDict()
        for s in strides:
            steps = int(round(math.log2(patch_size / s)))  # > 0: upsample x2 that many times; < 0: downsample
            layers: list[nn.Module] = []
            dim = in_dim
            for j in range(max(steps, 0)):
                if j > 0:
                    layers += [LayerNorm2d(dim), nn.GELU()]
                layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                dim //= 2
            if steps < 0:
                layers.append(nn.MaxPool2d(kernel_size=2**-steps))
            layers += [
                nn.Conv2d(dim, out_dim, kernel_size=1, bias=False),
                LayerNorm2d(out_dim),
                nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_dim),
            ]
            self.stages[str(s)] = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        """x [B, C, h, w] at the patch stride -> {stride: [B, Cb, H/stride, W/stride]}."""
        return {s: self.stages[str(s)](x) for s in self.strides}


class ViTBackbone(nn.Module):
    """ViT + simple feature pyramid; `vit` holds the timm-named weights that `load_pretrained` fills."""

    def __init__(self, *, vit: VisionTransformer, pyramid: SimpleFeaturePyramid) -> None:
        super().__init__()
        self.vit = vit
        self.pyramid = pyramid

    def forward(self, x: Tensor, *, attn_hook: BackboneHook | None = None) -> dict:
        """x [B, 3, H, W] -> dict(tokens [B, N, C], tokens_hw (h, w), pyramid {stride: [B, Cb, H/s, W/s]})."""
        tokens, hw = self.vit(x, attn_hook=attn_hook)
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *hw)  # [B, N, C] -> [B, C, h, w]
        return {"tokens": tokens, "tokens_hw": hw, "pyramid": self.pyramid(grid)}


_HF_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_IGNORED = ("head.", "pooler.", "classifier.")


def _to_timm_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an HF-layout ViT state dict (with or without the `vit.` prefix) to timm names; timm names pass through."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("vit.")
        if key.startswith(_IGNORED):
            continue
        if m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RULES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key, count=1)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"layer {layer}: {kind} of query/key/value incomplete (found {sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if out.get("cls_token") is not None and out["cls_token"].ndim == 2:
        out["cls_token"] = out["cls_token"][None]
    return out


def _read_state_dict(path: Path) -> dict[str, Tensor]:
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
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        return state
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or .pth)")


def load_pretrained(model: VisionTransformer | ViTBackbone, path: str | Path) -> None:
    """Load ViT weights (timm or HF layout, .safetensors or .pth) into `model`, resizing pos_embed to its grid.

    Raises CheckpointError listing every missing, unexpected or mis-shaped key.
    """
    vit = model.vit if isinstance(model, ViTBackbone) else model
    path = Path(path)
    state = _to_timm_names(_read_state_dict(path))
    refuse_finite(state, path)
    own = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].ndim == 3:
        pos = state["pos_embed"]
        if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no class-token entry (timm no_embed_class): give it zero
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        state["pos_embed"] = resize_pos_embed(pos, (vit.grid, vit.grid))
    problems = [f"missing: {k}" for k in own if k not in state]
    problems += [f"unexpected: {k}" for k in state if k not in own]
    problems += [
        f"shape: {k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise CheckpointError(f"{path}: does not fit the ViT ({len(problems)} problems): {shown}")
    vit.load_state_dict(state)
