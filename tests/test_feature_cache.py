"""infer.feature_cache: the frozen ViT's outputs from disk give exactly the scores computed without it, and are never
used where they could differ (other weights, training mode, gradients, another autocast state, a damaged file)."""

from __future__ import annotations

import torch

from tmtseg.config import load_config
from tmtseg.modeling.build import build_model
from tmtseg.modeling.feature_cache import FeatureCache
from tmtseg.modeling.inference import predict_logits

from .tiny import TINY


def _model_and_image():
    torch.manual_seed(0)
    model = build_model(load_config([], TINY), pretrained=False).eval()
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return model, image


def _scores(model, image):
    return predict_logits(model, image, out_size=(96, 128), mode="slide", crop=(64, 64), stride=(32, 32))


def test_cached_outputs_equal_computed_ones_and_are_read_back(tmp_path):
    model, image = _model_and_image()
    plain = _scores(model, image)
    cache = model.backbone.feature_cache = FeatureCache(tmp_path)
    first = _scores(model, image)  # 2 x 3 windows: computed and stored
    assert (cache.hits, cache.misses) == (0, 6)
    second = _scores(model, image)
    assert (cache.hits, cache.misses) == (6, 6)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    # a damaged file is computed again (and rewritten), the scores unchanged
    victim = next(tmp_path.rglob("*.safetensors"))
    victim.write_bytes(b"cut short")
    assert torch.equal(_scores(model, image), plain) and cache.misses == 7


def test_other_weights_training_gradients_or_autocast_do_not_use_it(tmp_path):
    model, image = _model_and_image()
    cache = model.backbone.feature_cache = FeatureCache(tmp_path)
    _scores(model, image)
    with torch.no_grad():
        model.backbone.vit.blocks[0].mlp.fc1.weight.add_(0.01)  # in place, as an optimizer step
    changed = _scores(model, image)
    assert cache.misses == 12  # another fingerprint: all computed again
    model.backbone.feature_cache = None
    assert torch.equal(changed, _scores(model, image))
    model.backbone.feature_cache = cache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _scores(model, image)
    assert cache.misses == 18
    before = (cache.hits, cache.misses)
    model.train()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64) * 255)
    model.eval()
    model(torch.rand(1, 3, 64, 64) * 255)  # gradients on
    assert (cache.hits, cache.misses) == before


def test_a_lora_update_is_never_replaced_by_the_frozen_vits_cached_outputs(tmp_path):
    """LoRA adds its update by forward hooks on the ViT's linear layers, with factors outside the ViT: the ViT's own
    weights (the cache key) are the source's, so a cached window would silently drop the update."""
    from tmtseg.adapt.tuning import LoRA

    model, image = _model_and_image()
    cache = model.backbone.feature_cache = FeatureCache(tmp_path)
    frozen = _scores(model, image)  # fills the cache, as a frozen-ViT run of the bench does first
    lora = LoRA(rank=2, alpha=2.0, targets=["qkv"])
    lora.attach(model)
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(0.0, 0.1)  # a trained update
    hits = cache.hits
    adapted = _scores(model, image)
    assert cache.hits == hits  # not one window read from the cache
    model.backbone.feature_cache = None
    assert torch.equal(adapted, _scores(model, image)) and not torch.allclose(adapted, frozen)


def test_under_tvts_attention_bias_the_last_blocks_input_is_kept_and_the_scores_are_unchanged(tmp_path):
    """TVT's bias acts on the last ViT block only: the cache keeps that block's input (not the final tokens, which the
    bias changes) and the last block runs, so TVT's evaluations read the cache too, with the same scores."""
    from tmtseg.adapt.build import build_model_with_loss

    torch.manual_seed(0)
    trainer = build_model_with_loss(load_config([], [*TINY, "adapt.method=tvt"])).eval()
    model, hooks = trainer.model, trainer.method.inference_hooks()
    assert hooks is not None and hooks.backbone_attn is not None
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def scores(with_hooks=True):
        return predict_logits(
            model,
            image,
            out_size=(96, 128),
            mode="slide",
            crop=(64, 64),
            stride=(32, 32),
            hooks=hooks if with_hooks else None,
        )

    plain, unbiased = scores(), scores(with_hooks=False)
    assert not torch.equal(plain, unbiased)  # the bias does change the prediction
    cache = model.backbone.feature_cache = FeatureCache(tmp_path)
    first = scores()
    assert (cache.hits, cache.misses) == (0, 6)
    second = scores()
    assert (cache.hits, cache.misses) == (6, 6)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    # the final tokens are another entry: a run without the bias neither reads the trunk's files nor is changed
    assert torch.equal(scores(with_hooks=False), unbiased) and cache.misses == 12
