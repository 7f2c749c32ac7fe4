"""ViT backbone: pretrained-weight loading in timm and HF layouts, refused and mismatched checkpoints (method.md §3)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tmtseg.errors import CheckpointError
from tmtseg.models.backbone import (
    SimpleFeaturePyramid,
    VisionTransformer,
    ViTBackbone,
    load_pretrained,
    resize_pos_embed,
)


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
    backbone = ViTBackbone(vit=dst, pyramid=SimpleFeaturePyramid(in_dim=32, out_dim=16, patch_size=16))
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
