"""The backbone (docs/method.md §3): a plain ViT with timm's parameter names (LayerScale and register tokens as DINOv2
has them) and ViTDet's simple feature pyramid to the true strides 4/8/16/32 for any patch size."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.modeling.feature_cache import hooked
from tmtseg.modeling.layers import DropPath, FrozenCastLinear, LayerNorm2d

# hook(tokens [B, N, C], (h, w)) -> additive per-key bias [B, 1 or heads, N] or None
BackboneHook = Callable[[Tensor, tuple[int, int]], Tensor | None]


class ViTAttention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = FrozenCastLinear(dim, 3 * dim)
        self.proj = FrozenCastLinear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, h, N, C/h]
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # [B, h, N, C/h]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class ViTMlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = FrozenCastLinear(dim, hidden_dim)
        self.fc2 = FrozenCastLinear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """CaiT / DINOv2 LayerScale: a learned per-channel scale of a residual branch (timm's `gamma`)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm ViT block with optional LayerScale; `bias` [B, 1 or h, 1, N] is added to every query's logits."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layerscale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim=dim, num_heads=num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), bias)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # [B, 3, H, W] -> [B, C, H/p, W/p]


def resize_pos_embed(
    pos: Tensor, grid: tuple[int, int], num_prefix: int = 1, offset: float = 0.0, antialias: bool = False
) -> Tensor:
    """Bicubic resize of a [1, prefix + g*g, C] position table to `grid`, as DINOv2 interpolates it; the prefix (class)
    entries are kept as they are.

    offset 0 samples the table at size-based coordinates (HF transformers' Dinov2 and timm); DINOv2's own hub models
    use offset 0.1, i.e. the scale factor (grid + 0.1) / g, a workaround for a floating-point issue in old torch.
    DINOv2 with registers (hub and HF) interpolates with antialias: it only matters when the grid shrinks.
    """
    prefix, table = pos[:, :num_prefix], pos[:, num_prefix:]
    g = math.isqrt(table.shape[1])
    if (g, g) == tuple(grid) and not offset:
        return pos
    table = table.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [1, C, g, g]
    if offset:
        factor = ((grid[0] + offset) / g, (grid[1] + offset) / g)
        table = F.interpolate(table, scale_factor=factor, mode="bicubic", antialias=antialias)  # [1, C, h, w]
        table = table[..., : grid[0], : grid[1]]
    else:
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=antialias)  # [1, C, h, w]
    return torch.cat([prefix, table.to(pos.dtype).flatten(2).transpose(1, 2)], dim=1)  # [1, prefix + h*w, C]


def resample_patch_kernel(weight: Tensor, size: int) -> Tensor:
    """FlexiViT's pseudo-inverse resize of a patch-embedding kernel [C, 3, p, p] to [C, 3, size, size]: the new
    kernel on a bilinearly resized patch gives the same token as the old kernel on the original patch (exact when
    upsampling, least squares when downsampling)."""
    p = weight.shape[-1]
    if p == size:
        return weight
    basis = torch.eye(p * p, dtype=torch.float64).view(p * p, 1, p, p)  # one image per input pixel
    resize = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False)  # [p*p, 1, s, s]
    resize = resize.view(p * p, size * size)  # row i: the resized image of basis pixel i, i.e. R^T
    w = weight.double().flatten(2).transpose(1, 2)  # [C, p*p, 3]
    new = torch.linalg.pinv(resize) @ w  # solve R^T w' = w: [s*s, p*p] x [C, p*p, 3] -> [C, s*s, 3]
    return new.transpose(1, 2).reshape(*weight.shape[:2], size, size).to(weight.dtype)  # [C, 3, s, s]


class VisionTransformer(nn.Module):
    """Plain ViT with a class token, optional register tokens and LayerScale; parameter names as timm's
    VisionTransformer (minus the head), so timm's `vit_small_patch14_dinov2` weights load as they are."""

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
        layerscale: float = 0.0,
        num_registers: int = 0,
        pos_offset: float = 0.0,
        pos_antialias: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.num_prefix = 1 + num_registers  # class token, then registers; position embeddings reach the class token
        self.pos_offset, self.pos_antialias = pos_offset, pos_antialias
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=r, layerscale=layerscale)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: Tensor, *, attn_hook: BackboneHook | None = None, hook_at: tuple[int, ...] | None = None
    ) -> tuple[Tensor, tuple[int, int]]:
        """x [B, 3, H, W] normalised, H and W multiples of the patch -> (patch tokens after norm [B, N, C], (h, w)).

        hook_at (read, start[, pool]): the hook reads the input of block `read` (with pool > 1, the mean of the
        layer-normed inputs of blocks read .. read + pool - 1) and its bias acts on every block from `start` on
        (read + pool - 1 <= start); None = (depth - 1, depth - 1), the last block only (TVT's reading)."""
        read, start, pool = self.hook_blocks(hook_at)
        return self.last(*self.trunk(x, upto=read), attn_hook=attn_hook, read=read, start=start, pool=pool)

    def hook_blocks(self, hook_at: tuple[int, ...] | None) -> tuple[int, int, int]:
        """hook_at checked and completed: (read, start, pool), pool 1 where hook_at gives none."""
        depth = len(self.blocks)
        read, start, pool = (*hook_at, 1)[:3] if hook_at is not None else (depth - 1, depth - 1, 1)
        if not (0 <= read <= start < depth and 1 <= pool <= start - read + 1):
            raise ValueError(f"hook_at={hook_at}: needs 0 <= read <= read + pool - 1 <= start < depth={depth}")
        return read, start, pool

    def trunk(self, x: Tensor, upto: int | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Everything before block `upto` (default: the last block): (its input [B, prefix + N, C], (h, w)). An
        attention hook acts from there on, so this part is the same with and without one (what the feature cache keeps
        for TVT)."""
        x = self.patch_embed(x)  # [B, C, h, w]
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, C]
        x = x + resize_pos_embed(self.pos_embed, hw, offset=self.pos_offset, antialias=self.pos_antialias)
        if self.reg_token is not None:  # DINOv2: registers join after the position embedding, without one
            x = torch.cat([x[:, :1], self.reg_token.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # [B, 1+R+N, C]
        for block in self.blocks[: len(self.blocks) - 1 if upto is None else upto]:
            x = block(x)
        return x, hw

    def last(
        self,
        x: Tensor,
        hw: tuple[int, int],
        *,
        attn_hook: BackboneHook | None = None,
        read: int | None = None,
        start: int | None = None,
        pool: int = 1,
    ) -> tuple[Tensor, tuple[int, int]]:
        """The blocks from `read` (default: the last) to the end, the hook's bias on the attention of those from `start`
        on, and the norm: the input of block `read` -> (tokens [B, N, C], hw). The hook reads that block's input
        tokens, or with pool > 1 the mean of the layer-normed inputs of blocks read .. read + pool - 1 (all before
        `start`: unbiased)."""
        depth = len(self.blocks)
        read = depth - 1 if read is None else read
        start = read if start is None else start
        inputs = [x[:, self.num_prefix :]]  # [B, N, C] each: the input tokens of blocks read .. read + pool - 1
        for block in self.blocks[read:start]:
            x = block(x)
            if len(inputs) < pool:
                inputs.append(x[:, self.num_prefix :])
        tokens = inputs[0]  # what the hook reads: that block's input, or the mean of the pooled ones, layer-normed
        if pool > 1:
            tokens = torch.stack([F.layer_norm(t, t.shape[-1:]) for t in inputs]).mean(0)  # [B, N, C]
        bias = None
        if attn_hook is not None:
            bias = attn_hook(tokens, hw)  # [B, 1 or h, N]
            if bias is not None:
                # the class and register keys get no bias; one bias row is shared by every query
                bias = F.pad(bias, (self.num_prefix, 0)).to(x.dtype)[:, :, None, :]  # [B, 1 or h, 1, P+N]
        for block in self.blocks[start:]:
            x = block(x, bias)
        return self.norm(x)[:, self.num_prefix :], hw  # [B, N, C]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: a token map at stride `in_stride` (a power of two), resampled by transposed
    convs / max-pooling to each stride."""

    def __init__(self, *, in_dim: int, out_dim: int, in_stride: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.strides = strides
        self.stages = nn.ModuleDict()
        for s in strides:
            steps = int(round(math.log2(in_stride / s)))  # > 0: upsample x2 that many times; < 0: downsample
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
        """x [B, C, h, w] at the input stride -> {stride: [B, Cb, h * in_stride / stride, ...]}."""
        return {s: self.stages[str(s)](x) for s in self.strides}


class ViTBackbone(nn.Module):
    """ViT + simple feature pyramid at the true strides 4/8/16/32 for any patch size.

    The pyramid starts from a token map at `token_stride` input pixels per token (a power of two). When the patch
    differs (DINOv2's 14), `fit` says how the two meet: "resize_input" resizes the image by patch / token_stride
    before the ViT, so the token grid is exactly the stride-`token_stride` grid (14 -> 16: 0.77x the tokens);
    "resize_tokens" runs the ViT on the image as it is (padded to the patch) and resamples the token map to that grid.
    `vit` holds the timm-named weights that `load_pretrained` fills.
    """

    kind = "vit"  # a plain ViT: one token map, the pyramid built from it (tmtseg/modeling/build.py: BACKBONES)

    def __init__(self, *, vit: VisionTransformer, pyramid: SimpleFeaturePyramid, token_stride: int, fit: str) -> None:
        super().__init__()
        if fit not in ("resize_input", "resize_tokens"):
            raise ValueError(f"fit must be resize_input or resize_tokens, not {fit!r}")
        self.vit, self.pyramid = vit, pyramid
        self.token_stride, self.fit = token_stride, fit
        self.feature_cache = None  # a FeatureCache: the ViT's outputs from disk where nothing can differ

    def forward(
        self,
        x: Tensor,
        *,
        attn_hook: BackboneHook | None = None,
        vit_tokens: tuple[Tensor, tuple] | None = None,
        hook_at: tuple[int, int] | None = None,
    ) -> dict:
        """x [B, 3, H, W], H and W multiples of the coarsest stride -> dict(tokens [B, N, C], tokens_hw (h, w),
        pyramid {stride: [B, Cb, H/s, W/s]}). vit_tokens: the ViT's (tokens, hw) for this x, computed elsewhere (the
        regularisers' frozen source model reuses the adapted model's when both ViTs are the same: regularisers.py).
        hook_at: which blocks the hook reads and biases (VisionTransformer.forward)."""
        p, s = self.vit.patch_size, self.token_stride
        H, W = x.shape[-2:]
        h, w = H // s, W // s  # the token grid the pyramid needs
        if p != s and self.fit == "resize_input":
            x = F.interpolate(x, size=(h * p, w * p), mode="bilinear", align_corners=False)  # [B, 3, h*p, w*p]
        elif p != s:
            x = F.pad(x, (0, -W % p, 0, -H % p))  # [B, 3, H'', W''] multiples of the patch
        cache = self.feature_cache
        cached = cache is not None and not self.training and not torch.is_grad_enabled() and not hooked(self.vit)
        last_only = self.vit.hook_blocks(hook_at)[:2] == (len(self.vit.blocks) - 1,) * 2
        if vit_tokens is not None:
            tokens, hw = vit_tokens
        elif cached and attn_hook is None:
            tokens, hw = cache.tokens(self.vit, x, lambda: self.vit(x))
        elif cached and last_only:  # the hook acts on the last block only: the trunk's output is the same without it
            hidden, hw = cache.tokens(self.vit, x, lambda: self.vit.trunk(x), part="trunk")
            tokens, hw = self.vit.last(hidden, hw, attn_hook=attn_hook)
        else:
            tokens, hw = self.vit(x, attn_hook=attn_hook, hook_at=hook_at)
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *hw)  # [B, N, C] -> [B, C, h', w']
        if tuple(hw) != (h, w):
            # token centres sit at (i + 0.5) * p input pixels: sample them at the centres of the stride-s grid
            grid = F.interpolate(grid, scale_factor=p / s, mode="bilinear", align_corners=False)
            grid = grid[..., :h, :w]  # [B, C, h, w]
        return {"tokens": tokens, "tokens_hw": hw, "pyramid": self.pyramid(grid)}
