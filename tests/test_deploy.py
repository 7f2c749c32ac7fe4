"""Deployment speed (issue 30): the decoder's inference fast path and the LayerScale fold compute what the plain
eval forward computed (within 1e-5 on tiny models) and training is untouched; the int8 quantisation's naming, check
and refusal on a one-MatMul ONNX model (seconds). The exported variants (the folded graph, int8 from a real export,
`predict --onnx` on it) are checked in tests/test_export.py, where the exports are."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config
from tmtseg.modeling.fuse import fold_layerscale
from tmtseg.modeling.inference import image_scores

from .tiny import TINY

TOL = 1e-5  # float rounding: the fast path resizes before the mask head's sum over channels, the fold after it
DINO = ["model.backbone.patch_size=14", "model.backbone.token_stride=8", "model.backbone.num_registers=1"]


def tiny(method: str = "finetune", *extra: str):
    """A tiny fpn model (TMA at full strength for tmt, so that the hook's bias matters) and a batch of two frames
    whose size is no multiple of 32 (the padded grid and the crop take part)."""
    cfg = load_config([], [*TINY, "adapt.acte.iters=1", "adapt.tma.lambda_init=1.0", f"adapt.method={method}", *extra])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg).eval()
    g = torch.Generator().manual_seed(1)
    return trainer, torch.randint(0, 256, (2, 3, 70, 90), dtype=torch.uint8, generator=g)


def slow_forward(model, images, hooks):
    """The eval forward as it was before the fast path: every layer's masks at H/4 x W/4 (the decoder's
    all_predictions=True, which training uses), the last one returned."""
    decoder = model.decoder
    original = decoder.forward
    decoder.forward = lambda *a, **k: original(*a, **{**k, "all_predictions": True})
    try:
        return model(images, hooks=hooks)
    finally:
        decoder.forward = original


@pytest.mark.parametrize("method", ["finetune", "tmt"])
def test_eval_fast_path_equals_the_full_decoder(method):
    trainer, x = tiny(method)
    hooks = trainer.method.inference_hooks()
    assert (hooks is not None) == (method == "tmt")  # tmt: TMA reads each layer's previous prediction
    with torch.no_grad():
        fast, slow = trainer.model(x, hooks=hooks), slow_forward(trainer.model, x, hooks)
    assert fast["aux_outputs"] == [] and len(slow["aux_outputs"]) == 3  # dec_layers=3: before each layer
    assert fast["pred_masks"].shape == slow["pred_masks"].shape == (2, 6, 18, 23)  # ceil(70/4) x ceil(90/4)
    torch.testing.assert_close(fast["pred_logits"], slow["pred_logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(fast["pred_masks"], slow["pred_masks"], atol=TOL, rtol=0)
    from tmtseg.modeling.inference import input_scores

    scores = input_scores(fast, x)
    torch.testing.assert_close(scores, input_scores(slow, x), atol=TOL, rtol=0)
    assert scores.shape == (2, 5, 70, 90)


def test_training_forward_is_untouched():
    """Train mode keeps deep supervision's predictions at H/4 x W/4, bit for bit the full decoder's."""
    trainer, x = tiny()
    trainer.model.train()
    out = trainer.model(x)
    full = slow_forward(trainer.model, x, None)
    assert len(out["aux_outputs"]) == 3
    for a, b in zip([*out["aux_outputs"], out], [*full["aux_outputs"], full], strict=True):
        assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    out["pred_masks"].sum().backward()  # the fast path is eval-only: gradients flow as before
    assert trainer.model.decoder.mask_embed.layers[0].weight.grad is not None


def test_layerscale_fold_is_exact_and_removes_the_scales():
    trainer, x = tiny("finetune", *DINO, "model.backbone.layerscale=0.5")
    vit = trainer.model.backbone.vit
    with torch.no_grad():  # LayerScale values far from 1 and from each other: a missed fold would show
        for block in vit.blocks:
            block.ls1.gamma.uniform_(-2.0, 2.0)
            block.ls2.gamma.uniform_(-2.0, 2.0)
        ref = image_scores(trainer.model, x, None)
    folded = copy.deepcopy(trainer.model)
    assert fold_layerscale(folded) == 2 * len(vit.blocks)
    assert not any("gamma" in name for name, _ in folded.named_parameters())
    with torch.no_grad():
        got = image_scores(folded, x, None)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert fold_layerscale(folded) == 0  # nothing left to fold: a second call changes nothing
    assert any("gamma" in name for name, _ in trainer.model.named_parameters())  # the copy was folded, not this


def test_layerscale_fold_leaves_lora_wrapped_layers_alone():
    """A tuned ViT whose proj / fc2 are not plain linear layers (LoRA) keeps its LayerScale: folding into a wrapped
    layer would miss the low-rank branch."""
    trainer, x = tiny("lora", *DINO, "model.backbone.layerscale=0.5", "adapt.lora.targets=[proj]")
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if name.startswith("method.lora.b."):  # B starts at 0: a trained update, so the branch counts
                p.normal_(0.0, 0.5)
        ref = image_scores(trainer.model, x, None)
        folded = fold_layerscale(trainer.model)
        got = image_scores(trainer.model, x, None)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert folded == len(trainer.model.backbone.vit.blocks)  # the fc2 ones only: every proj carries a LoRA hook


def _linear_onnx(path, weight: np.ndarray) -> None:
    """A one-MatMul model with the export's interface: image [1, 3, H, W] -> scores [1, K, H, W] = weight^T per
    pixel (seconds to build and quantise, where an export takes minutes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Transpose", ["image"], ["nhwc"], perm=[0, 2, 3, 1]),  # [1, H, W, 3]
        helper.make_node("MatMul", ["nhwc", "w"], ["logits"]),  # [1, H, W, K]
        helper.make_node("Transpose", ["logits"], ["scores"], perm=[0, 3, 1, 2]),  # [1, K, H, W]
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, weight.shape[1], "H", "W"])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


def test_int8_quantisation_names_checks_and_refuses(tmp_path, monkeypatch):
    import onnx

    from tmtseg.errors import ExportError
    from tmtseg.tools import ort
    from tmtseg.tools.export import smooth_images

    assert ort.int8_path(tmp_path / "m.onnx") == tmp_path / "m.int8.onnx"
    assert ort.int8_path(tmp_path / "m") == tmp_path / "m.int8.onnx"  # its JSON is not the fp32 model's m.json
    fp32 = tmp_path / "m.onnx"
    _linear_onnx(fp32, np.random.default_rng(0).normal(size=(3, 4)))
    images = [(f"{h}x{w}", im) for (h, w), im in zip([(20, 30), (33, 17)], smooth_images([(20, 30), (33, 17)]))]
    record = ort.write_int8(fp32, tmp_path / "m.int8.onnx", images)
    assert [n.op_type for n in onnx.load(tmp_path / "m.int8.onnx").graph.node].count("MatMulInteger") == 1
    checks = record["parity_vs_fp32"]["checks"]
    assert [c["image"] for c in checks] == ["20x30", "33x17"] and record["per_channel"] is True
    assert all(c["argmax_agreement"] >= ort.INT8_MIN_AGREEMENT and 0 < c["max_abs_diff"] < 5 for c in checks)
    monkeypatch.setattr(ort, "INT8_MIN_AGREEMENT", 1.01)  # no model can pass: the refusal names the image
    refused = r"int8: argmax agreement with the fp32 model .* on (20x30|33x17), below 101%"
    with pytest.raises(ExportError, match=refused):
        ort.write_int8(fp32, tmp_path / "again.int8.onnx", images)


def test_int8_vit_keeps_the_argmax_the_lora_branch_and_the_model_it_copies():
    """`predict --precision int8`'s model: every ViT linear layer int8 (the decoders' float), the LoRA branch on qkv
    kept as a float hook, the scores close to fp32's and the argmax nearly everywhere the same; the trainer's own
    segmenter is left float."""
    from tmtseg.modeling.quantize import Int8Linear, int8_copy

    trainer, x = tiny("lora", *DINO, "model.backbone.layerscale=0.5")
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if name.startswith("method.lora.b."):  # a trained update: dropping the branch would change the scores
                p.normal_(0.0, 0.5)
        ref = image_scores(trainer.model, x, None)
        model = int8_copy(trainer.model)
        got = image_scores(model, x, None)
        model.backbone.vit.blocks[0].attn.qkv._forward_hooks.clear()  # without the LoRA branch: far from fp32
        unbranched = image_scores(model, x, None)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 4 * len(model.backbone.vit.blocks)  # qkv, proj, fc1, fc2 of each block, nothing else
    assert not any(isinstance(m, Int8Linear) for m in trainer.model.modules())
    assert isinstance(model.backbone.vit.blocks[0].ls2, torch.nn.Identity)  # the exact fusions came first
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.05 < (unbranched - ref).abs().max().item()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
