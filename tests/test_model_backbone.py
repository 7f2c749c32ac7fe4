"""ViT backbone: pretrained weights in timm and HF layouts, refused and mismatched checkpoints (docs/method.md §3)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tmtseg.errors import CheckpointError
from tmtseg.modeling.backbones.vit import SimpleFeaturePyramid, VisionTransformer, ViTBackbone, resize_pos_embed
from tmtseg.modeling.backbones.vit_checkpoint import load_pretrained


def vit(img_size: int, seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=16, img_size=img_size)


def hf_layout(state: dict, prefix: str) -> dict:
    """timm names -> HF ViTModel names (q/k/v split), the reverse of what the loader does."""
    out = {
        f"{prefix}embeddings.cls_token": state["cls_token"],
        f"{prefix}embeddings.position_embeddings": state["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": state["norm.weight"],
        f"{prefix}layernorm.bias": state["norm.bias"],
        "pooler.dense.weight": torch.zeros(32, 32),
    }
    for i in range(2):
        src, dst = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out |= {
                f"{dst}attention.attention.query.{kind}": q,
                f"{dst}attention.attention.key.{kind}": k,
                f"{dst}attention.attention.value.{kind}": v,
                f"{dst}attention.output.dense.{kind}": state[f"{src}attn.proj.{kind}"],
                f"{dst}layernorm_before.{kind}": state[f"{src}norm1.{kind}"],
                f"{dst}layernorm_after.{kind}": state[f"{src}norm2.{kind}"],
                f"{dst}intermediate.dense.{kind}": state[f"{src}mlp.fc1.{kind}"],
                f"{dst}output.dense.{kind}": state[f"{src}mlp.fc2.{kind}"],
            }
    return out


def assert_loaded(dst: VisionTransformer, src: VisionTransformer) -> None:
    got, want = dst.state_dict(), src.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        if key == "pos_embed":
            torch.testing.assert_close(got[key], resize_pos_embed(want[key], (dst.grid, dst.grid)))
        else:
            torch.testing.assert_close(got[key], want[key])


def test_timm_safetensors_round_trip_with_another_pos_grid(tmp_path):
    src, dst = vit(96, seed=0), vit(64, seed=1)  # 6x6 vs 4x4 position grid
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    save_file(state, tmp_path / "vit.safetensors")
    load_pretrained(dst, tmp_path / "vit.safetensors")
    assert dst.pos_embed.shape == (1, 17, 32)
    assert_loaded(dst, src)


@pytest.mark.parametrize("prefix", ["vit.", ""])
def test_hf_layout_pth_round_trip(tmp_path, prefix):
    src, dst = vit(64, seed=0), vit(64, seed=1)
    torch.save(hf_layout(src.state_dict(), prefix), tmp_path / "hf.pth")
    pyramid = SimpleFeaturePyramid(in_dim=32, out_dim=16, in_stride=16)
    backbone = ViTBackbone(vit=dst, pyramid=pyramid, token_stride=16, fit="resize_input")
    load_pretrained(backbone, tmp_path / "hf.pth")
    assert_loaded(dst, src)


def test_wrapped_pth_without_class_position_entry(tmp_path):
    src, dst = vit(64, seed=0), vit(64, seed=1)
    state = src.state_dict()
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm no_embed_class layout: patch grid only
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    load_pretrained(dst, tmp_path / "wrapped.pth")
    torch.testing.assert_close(dst.pos_embed[:, 1:], src.pos_embed[:, 1:])
    assert (dst.pos_embed[:, 0] == 0).all()


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    state = vit(64, seed=0).state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    state["blocks.0.attn.proj.weight"] = torch.zeros(32, 16)
    state["extra.thing"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    dst = vit(64, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing: blocks.1.mlp.fc2.weight" in msg
    assert "unexpected: extra.thing" in msg
    assert "blocks.0.attn.proj.weight checkpoint (32, 16) vs model (32, 32)" in msg
    for key, value in dst.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(value, before[key])


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": vit(64, seed=0).state_dict(), "x": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_pretrained(vit(64, seed=1), tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(vit(64, seed=0), tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_pretrained(vit(64, seed=0), tmp_path / "w.npz")
    (tmp_path / "junk.pth").write_bytes(b"garbage, not a pickle")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_pretrained(vit(64, seed=0), tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a header")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(vit(64, seed=0), tmp_path / "junk.safetensors")


def test_vit_runs_at_any_grid_and_keeps_timm_names():
    model = vit(64, seed=0)
    tokens, hw = model(torch.randn(1, 3, 48, 80))
    assert hw == (3, 5) and tokens.shape == (1, 15, 32)
    names = set(model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.bias"} <= names
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"} <= names


# --- DINOv2-style ViTs: LayerScale, registers, patch 14, every checkpoint layout a user brings -------------------


def dino(seed: int, *, registers: int = 0, img_size: int = 56) -> VisionTransformer:
    """A tiny DINOv2-shaped ViT (patch 14, LayerScale, optional registers) with every weight random."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        embed_dim=32, depth=2, num_heads=2, patch_size=14, img_size=img_size, layerscale=1e-5, num_registers=registers
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # LayerScale and tokens too: a layout that drops or swaps one must change the output
    return model.eval()


def test_hf_dinov2_model_and_registers_load_with_identical_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")  # in the dev extra: the reference implementation
    for registers in (0, 2):
        cfg = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            patch_size=14,
            image_size=56,
            layerscale_value=0.5,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
        torch.manual_seed(registers)
        if registers:
            hf = transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(**cfg, num_register_tokens=registers)
            )
        else:
            hf = transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.2)
        hf.eval()
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf.safetensors")
        ours = dino(seed=9, registers=registers)
        ours.pos_antialias = bool(registers)  # model.backbone.pos_antialias: HF's registers model antialiases
        load_pretrained(ours, tmp_path / "hf.safetensors")
        x = torch.randn(2, 3, 70, 42)  # a 5x3 grid: the 4x4 position table is interpolated in both
        with torch.no_grad():
            want = hf(pixel_values=x).last_hidden_state[:, 1 + registers :]
            got, hw = ours(x)
        assert hw == (5, 3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _as_dinov2_original(state: dict, *, chunked: bool) -> dict:
    """timm names -> DINOv2's own `dinov2_vits14_pretrain.pth` names (registers as register_tokens, a mask token)."""
    out = {}
    for k, v in state.items():
        if k == "reg_token":
            k = "register_tokens"
        elif chunked and k.startswith("blocks."):
            k = "blocks.0." + k.removeprefix("blocks.")  # block_chunks: blocks.<chunk>.<global index>.
        out[k] = v
    out["mask_token"] = torch.zeros(1, 32)
    return out


def _as_timm_dinov2_reg(state: dict) -> dict:
    """DINOv2 with registers in timm's layout: no class entry in pos_embed, the class position folded into cls_token."""
    out = dict(state)
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("layout", ["timm", "dinov2_pth", "dinov2_pth_chunked"])
def test_dinov2_layouts_load_with_identical_outputs(tmp_path, layout, registers):
    src = dino(seed=0, registers=registers)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if layout == "timm" and registers:
        state = _as_timm_dinov2_reg(state)
    elif layout.startswith("dinov2_pth"):
        state = _as_dinov2_original(state, chunked=layout.endswith("chunked"))
    path = tmp_path / ("w.pth" if layout.startswith("dinov2_pth") else "w.safetensors")
    torch.save({"teacher": state}, path) if path.suffix == ".pth" else save_file(state, path)
    dst = dino(seed=1, registers=registers)
    load_pretrained(dst, path)
    x = torch.randn(1, 3, 84, 56)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)[0], src(x)[0], atol=1e-5, rtol=1e-5)


def test_register_tokens_change_the_patch_tokens_and_get_no_position():
    model = dino(seed=0, registers=3)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        base = model(x)[0]
        model.reg_token.add_(torch.randn_like(model.reg_token))
        assert not torch.allclose(model(x)[0], base)  # the registers take part in attention
    assert model.pos_embed.shape == (1, 1 + 16, 32)  # class + 4x4 grid: registers have no position entry


def test_dinov2_position_offset_interpolates_like_the_hub_models():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    size_based = resize_pos_embed(pos, (16, 20))
    with_offset = resize_pos_embed(pos, (16, 20), offset=0.1)
    assert size_based.shape == with_offset.shape == (1, 1 + 320, 8)
    table = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(table, scale_factor=(16.1 / 37, 20.1 / 37), mode="bicubic")
    torch.testing.assert_close(with_offset[:, 1:], want.flatten(2).transpose(1, 2))
    assert not torch.allclose(size_based, with_offset)
    assert resize_pos_embed(pos, (37, 37)) is pos  # the table's own grid: untouched


def test_flexivit_kernel_resampling_keeps_the_token():
    from tmtseg.modeling.backbones.vit import resample_patch_kernel

    torch.manual_seed(0)
    w, x = torch.randn(5, 3, 8, 8), torch.randn(4, 3, 8, 8)
    w16 = resample_patch_kernel(w, 16)
    x16 = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.einsum("ocij,bcij->bo", w16, x16), torch.einsum("ocij,bcij->bo", w, x))


def test_pretrained_kernel_of_another_patch_size_is_resampled_at_load(tmp_path):
    src = dino(seed=0)  # patch 14
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    dst = VisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=16, img_size=64, layerscale=1e-5)
    load_pretrained(dst, tmp_path / "w.safetensors")
    assert dst.patch_embed.proj.weight.shape == (32, 3, 16, 16)
    torch.testing.assert_close(dst.blocks[1].ls2.gamma, src.blocks[1].ls2.gamma)


@pytest.mark.parametrize("fit", ["resize_input", "resize_tokens"])
def test_patch_14_pyramid_has_the_true_strides(fit):
    vit = dino(seed=0)
    backbone = ViTBackbone(
        vit=vit, pyramid=SimpleFeaturePyramid(in_dim=32, out_dim=8, in_stride=16), token_stride=16, fit=fit
    )
    x = torch.randn(2, 3, 96, 160)  # multiples of 32, not of 14
    out = backbone(x)
    assert {s: tuple(t.shape[-2:]) for s, t in out["pyramid"].items()} == {
        4: (24, 40),
        8: (12, 20),
        16: (6, 10),
        32: (3, 5),
    }
    # resize_input: the ViT sees the image at 14/16 scale, one token per 16 px; resize_tokens: the native 7x12 grid
    assert out["tokens_hw"] == ((6, 10) if fit == "resize_input" else (7, 12))
    out["pyramid"][4].sum().backward()
    assert vit.patch_embed.proj.weight.grad is not None
