"""Semantic inference (docs/method.md §3): semantic_probs against a loop, whole vs sliding-window prediction."""

from __future__ import annotations

import torch
from torch import nn

from tmtseg.config import Config
from tmtseg.modeling.build import build_model
from tmtseg.modeling.inference import _window_starts, predict_logits, semantic_probs

K = 4


def tiny_model() -> nn.Module:
    cfg = Config()
    b = cfg.model.backbone
    b.embed_dim, b.depth, b.num_heads, b.patch_size, b.img_size = 32, 1, 2, 16, 64
    m = cfg.model
    m.conv_dim = m.mask_dim = m.hidden_dim = 32
    m.num_queries, m.nheads, m.dec_layers, m.dim_feedforward = 6, 2, 3, 64
    cfg.data.num_classes = K
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_semantic_probs_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 5, K + 1, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    ref = torch.zeros(2, K, 3, 4)
    for b in range(2):
        cls = logits[b].softmax(-1)
        for q in range(5):
            for k in range(K):
                ref[b, k] += cls[q, k] * masks[b, q].sigmoid()
    torch.testing.assert_close(semantic_probs(logits, masks), ref)


def test_window_starts_cover_the_image():
    assert _window_starts(64, 64, 32) == [0]
    assert _window_starts(50, 64, 32) == [0]
    assert _window_starts(100, 64, 32) == [0, 32, 36]
    assert _window_starts(160, 64, 48) == [0, 48, 96]


def test_slide_with_a_window_as_large_as_the_image_equals_whole():
    model = tiny_model()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = predict_logits(model, image, out_size=(100, 140), mode="whole")
    slide = predict_logits(model, image, out_size=(100, 140), mode="slide", crop=(50, 70), stride=(32, 32))
    larger = predict_logits(model, image, out_size=(100, 140), mode="slide", crop=(64, 96), stride=(32, 32))
    assert whole.shape == (1, K, 100, 140) and torch.isfinite(whole).all()
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(larger, whole)


def test_slide_overlapping_windows_batch_and_average():
    model = tiny_model()
    batch = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = predict_logits(model, batch, out_size=(64, 96), mode="slide", crop=(64, 64), stride=(32, 16))
    assert out.shape == (2, K, 64, 96) and torch.isfinite(out).all()
    # the left 16 columns are seen by the first window only, so they equal that window's own scores
    first = predict_logits(model, batch[..., :64], out_size=(64, 64), mode="whole")
    torch.testing.assert_close(out[..., :16], first[..., :16])
    # columns 16-32 are the average of the first two windows
    second = predict_logits(model, batch[..., 16:80], out_size=(64, 64), mode="whole")
    torch.testing.assert_close(out[..., 16:32], (first[..., 16:32] + second[..., :16]) / 2)


class ConstantModel(nn.Module):
    """Predicts the same scores everywhere: any correct averaging of windows must return them unchanged."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0]]))

    def forward(self, images, *, hooks=None):
        B, _, H, W = images.shape
        masks = torch.ones(B, 1, -(-H // 4), -(-W // 4))
        return {"pred_logits": self.logits.expand(B, 1, -1), "pred_masks": masks}


def test_slide_average_of_a_constant_model_is_constant():
    model = ConstantModel()
    out = predict_logits(
        model,
        torch.zeros(3, 70, 90, dtype=torch.uint8),
        out_size=(35, 45),
        mode="slide",
        crop=(32, 32),
        stride=(20, 24),
    )
    expected = model.logits.softmax(-1)[0, :-1] * torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(out, expected[None, :, None, None].expand(1, -1, 35, 45))


def test_evaluation_runs_under_bf16_autocast_when_training_did():
    from tmtseg.config import load_config
    from tmtseg.data import build_dataset
    from tmtseg.engine.evaluate import evaluate

    from .tiny import TINY

    cfg = load_config([], [*TINY, "data.val.num_images=3"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
    seen = []
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    scores = {}
    for amp in ("none", "bf16"):
        scores[amp] = evaluate(
            model, dataset, mode="whole", crop=(64, 64), stride=(64, 64), device=torch.device("cpu"), binary=False,
            amp=amp,
        )["mIoU"]  # fmt: skip
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3
    assert abs(scores["bf16"] - scores["none"]) < 5.0


def test_evaluation_runs_the_methods_inference_pieces_in_eval_mode_and_restores_training():
    """TVT's discriminators run at inference (their T biases the last block's attention): with their dropout left on,
    the scores of an evaluation during training would be random."""
    from tmtseg.adapt.build import build_model_with_loss
    from tmtseg.config import load_config
    from tmtseg.data import build_dataset
    from tmtseg.engine.evaluate import evaluate_model_with_loss as _evaluate

    from .tiny import TINY

    cfg = load_config([], [*TINY, "adapt.method=tvt", "data.val.num_images=2"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg).train()
    dropouts = [m for m in trainer.method.modules() if isinstance(m, nn.Dropout)]
    assert dropouts
    modes = []
    for m in dropouts:
        m.register_forward_hook(lambda mod, i, out: modes.append(mod.training))
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
    first = _evaluate(trainer, cfg, dataset, torch.device("cpu"), progress=False)
    assert modes and not any(modes)  # the discriminators ran, without dropout
    assert trainer.training and trainer.method.training and all(m.training for m in dropouts)  # training resumes
    assert _evaluate(trainer, cfg, dataset, torch.device("cpu"), progress=False) == first
