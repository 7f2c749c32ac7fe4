import pytest
import torch

from tmtseg.config import load_config
from tmtseg.methods import build_trainer

from .tiny import TINY


def _batch(seed, b=2, h=64, w=64, k=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, k, (b, h, w), generator=g),
    }


def test_tmt_with_lambda_zero_predicts_exactly_as_vanilla():
    torch.manual_seed(0)
    tmt = build_trainer(load_config([], [*TINY, "adapt.method=tmt"])).eval()
    vanilla = build_trainer(load_config([], TINY)).eval()
    vanilla.model.load_state_dict(tmt.model.state_dict())
    images = _batch(1)["image"]
    with torch.no_grad():
        a = tmt.model(images, hooks=tmt.method.inference_hooks())
        b = vanilla.model(images, hooks=vanilla.method.inference_hooks())
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=0)
    with torch.no_grad():
        tmt.method.tma.lambdas.fill_(1.0)  # and TMA is not a no-op once lambda moves
        c = tmt.model(images, hooks=tmt.method.inference_hooks())
    assert not torch.allclose(c["pred_masks"], b["pred_masks"])


@pytest.mark.parametrize("method", ["finetune", "dann", "tvt", "tmt"])
def test_every_method_trains_every_parameter(method):
    torch.manual_seed(0)
    trainer = _with_teacher([f"adapt.method={method}", "adapt.tma.lambda_init=0.5"])
    losses = trainer({"target": _batch(1), "source": _batch(2)}, step=5)
    assert torch.isfinite(losses["loss"])
    assert ("loss_adv" in losses) == (method != "finetune")
    assert ("loss_preserve" in losses) == (method == "tmt")  # TMT's default: the preservation term on
    losses["loss"].backward()
    no_grad = [n for n, p in trainer.named_parameters() if p.requires_grad and (p.grad is None)]
    # msdeform is not used here; the class-token positional entry only feeds the class token, which the decoder
    # never reads: every other parameter must be trained
    assert [n for n in no_grad if "cls_token" not in n and "pos_embed" not in n] == []


def test_unsupervised_variant_never_reads_target_labels():
    torch.manual_seed(0)
    trainer = _with_teacher(["adapt.method=tmt", "adapt.unsupervised=true"])
    trainer.eval()  # no dropout: the two calls must see the same computation
    target, source = _batch(1), _batch(2)
    torch.manual_seed(0)  # the criterion samples random points
    a = trainer({"target": target, "source": source}, step=3)["loss"]
    target["label"] = torch.full_like(target["label"], 255)
    torch.manual_seed(0)
    b = trainer({"target": target, "source": source}, step=3)["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_grl_pushes_features_against_the_discriminator():
    """With the GRL the backbone gradient of the adversarial term points opposite to the discriminator's own."""
    torch.manual_seed(0)
    trainer = build_trainer(load_config([], [*TINY, "adapt.method=dann", "adapt.adv_weight=1.0"])).eval()
    method = trainer.method  # eval: the discriminator's dropout would make the two passes differ
    hooks_t, hooks_s = method.hooks(grl=1.0), method.hooks(grl=1.0)
    feats_t = trainer.model.encode(_batch(1)["image"], hooks=hooks_t)
    trainer.model.encode(_batch(2)["image"], hooks=hooks_s)
    feats_t["tokens"].retain_grad()
    method.domain_loss(hooks_t, hooks_s, labelled_is_source=False).backward()
    with_grl = feats_t["tokens"].grad.clone()
    trainer.zero_grad()
    hooks_t, hooks_s = method.hooks(grl=1.0), method.hooks(grl=1.0)
    hooks_t.grl = hooks_s.grl = -1.0  # a negative coefficient undoes the reversal
    feats_t = trainer.model.encode(_batch(1)["image"], hooks=hooks_t)
    trainer.model.encode(_batch(2)["image"], hooks=hooks_s)
    feats_t["tokens"].retain_grad()
    method.domain_loss(hooks_t, hooks_s, labelled_is_source=False).backward()
    torch.testing.assert_close(with_grl, -feats_t["tokens"].grad)


def test_optimizer_gives_lambda_and_discriminators_their_own_lr():
    from tmtseg.runner import build_optimizer

    cfg = load_config([], [*TINY, "adapt.method=tmt", "train.lr=1e-4", "train.backbone_lr_mult=0.5",
                           "adapt.head_lr_mult=10", "adapt.tma.lambda_lr_mult=100"])  # fmt: skip
    trainer = build_trainer(cfg)
    opt = build_optimizer(cfg, trainer)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(trainer.named_parameters())
    assert lr_of[id(named["method.tma.lambdas"])] == pytest.approx(1e-2) and wd_of[id(named["method.tma.lambdas"])] == 0
    disc = [n for n in named if n.startswith("method.acte.discriminator.") and n.endswith("weight")]
    assert disc and all(lr_of[id(named[n])] == pytest.approx(1e-3) for n in disc)
    assert all(lr_of[id(p)] == pytest.approx(5e-5) for n, p in named.items() if n.startswith("model.backbone."))
    assert all(lr_of[id(p)] == pytest.approx(1e-4) for n, p in named.items() if n.startswith("model.decoder."))
    assert len(lr_of) == len(named)  # every parameter is optimised, once


def test_tmt_loss_weight_reweights_the_mask_losses_only():
    torch.manual_seed(0)
    trainer = _with_teacher(["adapt.method=tmt", "adapt.tma.loss_weight=2.0"])
    batch = _batch(1)
    hooks = trainer.method.hooks(grl=0.5)
    outputs = trainer.model(batch["image"], hooks=hooks)
    weight = trainer.method.point_weight(hooks, outputs)
    assert weight.shape == (2, 1, *outputs["pred_masks"].shape[-2:])  # on the prediction grid
    assert weight.min() >= 1.0 and weight.max() <= 3.0  # 1 + beta * W, W in [0, 1]
    assert build_trainer(load_config([], [*TINY, "adapt.method=tmt"])).method.point_weight(hooks, outputs) is None

    # the weights reach the criterion: a map that zeroes half of the image changes the mask losses, not the class loss
    half = torch.ones_like(weight)
    half[..., : half.shape[-1] // 2] = 0.0
    out = {}
    for name, fn in (("plain", lambda h, o: None), ("half", lambda h, o: half)):
        trainer.method.point_weight = fn
        torch.manual_seed(1)
        out[name] = trainer({"target": batch, "source": _batch(2)}, step=3)
    torch.testing.assert_close(out["half"]["loss_ce"], out["plain"]["loss_ce"])
    assert not torch.allclose(out["half"]["loss_mask"], out["plain"]["loss_mask"])


def _with_teacher(overrides):
    """A trainer and a frozen copy of its segmenter as the source model (as the runner attaches one)."""
    import copy

    torch.manual_seed(0)
    trainer = build_trainer(load_config([], [*TINY, *overrides]))
    trainer.method.set_teacher(copy.deepcopy(trainer.model))
    return trainer


@pytest.mark.parametrize("images", ["source", "target", "both"])
def test_preserve_is_zero_at_the_source_model_and_grows_as_the_model_moves(images):
    trainer = _with_teacher(["adapt.method=tmt", "adapt.preserve.weight=1.0", f"adapt.preserve.images={images}"])
    batches = {"target": _batch(1), "source": _batch(2)}
    losses = trainer(batches, step=3)
    assert losses["loss_preserve"].item() == pytest.approx(0.0, abs=1e-5)  # the adapted model is still the source
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
    losses = trainer(batches, step=3)
    assert losses["loss_preserve"].item() > 1e-3
    losses["loss"].backward()
    assert trainer.model.decoder.class_embed.bias.grad is not None
    # the teacher is no part of the trainer: never optimised, never in a checkpoint
    assert not any(k.startswith("method._teacher") for k in trainer.state_dict())
    assert all(p.grad is None for p in trainer.method._teacher[0].parameters())


def test_finetune_with_preserve_on_source_images_reads_the_source_batch():
    plain = build_trainer(load_config([], [*TINY, "adapt.method=finetune"]))
    assert not plain.method.needs_source and not plain.method.wants_teacher
    trainer = _with_teacher(["adapt.method=finetune", "adapt.preserve.weight=1.0", "adapt.preserve.methods=[finetune]"])
    assert trainer.method.needs_source and trainer.method.transferability(None, (4, 4)) is None  # uniform weights
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(1.0)
    a = trainer({"target": _batch(1), "source": _batch(2)}, step=3)["loss_preserve"]
    b = trainer({"target": _batch(1), "source": _batch(3)}, step=3)["loss_preserve"]
    assert a.item() != pytest.approx(b.item())  # computed on the source batch


def test_preserve_counts_each_pixel_by_its_transferability():
    trainer = _with_teacher(["adapt.method=tmt", "adapt.preserve.weight=1.0", "adapt.preserve.images=target"])
    method = trainer.method
    batch = _batch(1)
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
        hooks = method.hooks(grl=0.5)
        outputs = trainer.model(batch["image"], hooks=hooks)
        t = method.transferability(hooks, outputs["pred_masks"].shape[-2:])
        assert t.shape == (2, 1, *outputs["pred_masks"].shape[-2:]) and 0 <= t.min() and t.max() <= 1
        weighted = method.preserve_loss(batch["image"], outputs, hooks)
        method.transferability = lambda h, hw: torch.ones(2, 1, *hw)
        uniform = method.preserve_loss(batch["image"], outputs, hooks)
        right = torch.zeros(2, 1, *outputs["pred_masks"].shape[-2:])
        right[..., right.shape[-1] // 2 :] = 1.0
        method.transferability = lambda h, hw: right
        half = method.preserve_loss(batch["image"], outputs, hooks)
    assert uniform.item() > 0 and weighted.item() > 0
    assert half.item() != pytest.approx(uniform.item())  # only the right half counts
