"""Loss values of every pre-refactor method, pinned: the methods-as-pieces refactor must compute the same numbers.

The values were computed by the `Finetune` subclass tree (commit 84349f5) on the tiny model; eval mode pins the
computation itself, train mode also the order of the random draws (dropout, the criterion's points)."""

import copy

import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config

from .tiny import TINY

CASES = {
    "finetune": ["adapt.method=finetune"],
    "finetune_kl": ["adapt.method=finetune", "adapt.preserve.methods=[finetune]", "adapt.preserve.images=both"],
    "dann": ["adapt.method=dann"],
    "dann_unsup": ["adapt.method=dann", "adapt.unsupervised=true"],
    "tvt": ["adapt.method=tvt"],
    "tmt": ["adapt.method=tmt"],
    "tmt_full": [
        "adapt.method=tmt",
        "adapt.tma.lambda_init=0.5",
        "adapt.tma.loss_weight=1.0",
        "adapt.preserve.images=both",
    ],
    "tmt_unsup": ["adapt.method=tmt", "adapt.unsupervised=true", "adapt.preserve.images=target"],
}

PINNED = {
    "finetune/eval": {
        "loss": 41.9844,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "grad_model": 35.0216,
        "grad_method": 0,
    },
    "finetune/train": {
        "loss": 41.9844,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "grad_model": 35.0216,
        "grad_method": 0,
    },
    "finetune_kl/eval": {
        "loss": 42.455,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "loss_preserve": 0.47059,
        "grad_model": 36.9791,
        "grad_method": 0,
    },
    "finetune_kl/train": {
        "loss": 42.455,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "loss_preserve": 0.47059,
        "grad_model": 36.9791,
        "grad_method": 0,
    },
    "dann/eval": {
        "loss": 42.1238,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "loss_adv": 0.139367,
        "grad_model": 35.0216,
        "grad_method": 0.0119603,
    },
    "dann/train": {
        "loss": 42.1617,
        "loss_ce": 4.24604,
        "loss_mask": 3.33368,
        "loss_dice": 3.56934,
        "loss_adv": 0.138831,
        "grad_model": 35.0492,
        "grad_method": 0.0229566,
    },
    "dann_unsup/eval": {
        "loss": 42.24,
        "loss_ce": 4.34952,
        "loss_mask": 3.36519,
        "loss_dice": 3.5383,
        "loss_adv": 0.139367,
        "grad_model": 30.2308,
        "grad_method": 0.0119603,
    },
    "dann_unsup/train": {
        "loss": 42.2845,
        "loss_ce": 4.32112,
        "loss_mask": 3.34946,
        "loss_dice": 3.57038,
        "loss_adv": 0.139804,
        "grad_model": 31.0931,
        "grad_method": 0.0211349,
    },
    "tvt/eval": {
        "loss": 42.2623,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "loss_adv": 0.277839,
        "grad_model": 35.0217,
        "grad_method": 0.0116725,
    },
    "tvt/train": {
        "loss": 42.2411,
        "loss_ce": 4.24604,
        "loss_mask": 3.34317,
        "loss_dice": 3.56683,
        "loss_adv": 0.277142,
        "grad_model": 34.0805,
        "grad_method": 0.0217739,
    },
    "tmt/eval": {
        "loss": 42.5674,
        "loss_ce": 4.24604,
        "loss_mask": 3.33114,
        "loss_dice": 3.56505,
        "loss_adv": 0.138548,
        "loss_preserve": 0.444419,
        "grad_model": 36.8003,
        "grad_method": 0.00496712,
    },
    "tmt/train": {
        "loss": 42.4285,
        "loss_ce": 4.24604,
        "loss_mask": 3.33267,
        "loss_dice": 3.53343,
        "loss_adv": 0.138363,
        "loss_preserve": 0.444419,
        "grad_model": 36.2506,
        "grad_method": 0.0190935,
    },
    "tmt_full/eval": {
        "loss": 42.6171,
        "loss_ce": 4.24604,
        "loss_mask": 3.33115,
        "loss_dice": 3.57097,
        "loss_adv": 0.138548,
        "loss_preserve": 0.47057,
        "grad_model": 36.9343,
        "grad_method": 0.00496647,
    },
    "tmt_full/train": {
        "loss": 42.4778,
        "loss_ce": 4.24604,
        "loss_mask": 3.33267,
        "loss_dice": 3.53925,
        "loss_adv": 0.138363,
        "loss_preserve": 0.470572,
        "grad_model": 36.406,
        "grad_method": 0.0190933,
    },
    "tmt_unsup/eval": {
        "loss": 42.7359,
        "loss_ce": 4.34952,
        "loss_mask": 3.36519,
        "loss_dice": 3.5383,
        "loss_adv": 0.138548,
        "loss_preserve": 0.49676,
        "grad_model": 32.772,
        "grad_method": 0.00496753,
    },
    "tmt_unsup/train": {
        "loss": 42.7889,
        "loss_ce": 4.2982,
        "loss_mask": 3.3527,
        "loss_dice": 3.60833,
        "loss_adv": 0.138663,
        "loss_preserve": 0.49676,
        "grad_model": 33.7018,
        "grad_method": 0.012691,
    },
}


def _batch(seed, b=2, h=64, w=64, k=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, k, (b, h, w), generator=g),
    }


def _pre_refactor_draws(*shape, low=0.0, high=1.0, device=None):
    """The point coordinates as the pinned code drew them: torch.rand (the criterion now draws 16-bit coordinates, four
    per 64-bit integer, a different stream of the same distribution)."""
    return torch.rand(shape, device=device) * (high - low) + low


@pytest.mark.parametrize("key", sorted(PINNED))
def test_losses_and_gradients_equal_the_pre_refactor_values(key, monkeypatch):
    import tmtseg.losses.criterion as criterion
    import tmtseg.losses.matcher as matcher

    monkeypatch.setattr(matcher, "uniform_coords", _pre_refactor_draws)
    monkeypatch.setattr(criterion, "uniform_coords", _pre_refactor_draws)
    # and every mask drew its own candidate points (the criterion now shares one draw among the masks of an image at
    # a decoder layer: the same distribution per mask, another stream)
    real = criterion.uncertain_point_coords
    monkeypatch.setattr(criterion, "uncertain_point_coords", lambda logits, groups=None, **kw: real(logits, **kw))
    name, mode = key.split("/")
    torch.manual_seed(0)
    trainer = build_model_with_loss(load_config([], [*TINY, *CASES[name]]))
    teacher = copy.deepcopy(trainer.model)
    if trainer.method.wants_teacher:
        trainer.method.set_teacher(teacher)
    with torch.no_grad():  # move the adapted model off the source model, so that the KL term is not 0
        bias = trainer.model.decoder.class_embed.bias
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)))
    trainer.train(mode == "train")
    torch.manual_seed(7)
    target, source = _batch(1), _batch(2)  # the old code took them by domain; the unsupervised variant learns from
    unsupervised = "adapt.unsupervised=true" in CASES[name]  # the source's labels
    batches = {"labelled": source, "unlabelled": target} if unsupervised else {"labelled": target, "unlabelled": source}
    losses = trainer(batches, step=5)
    losses["loss"].backward()
    grads = {part: [p.grad.norm() for n, p in trainer.named_parameters() if n.startswith(part) and p.grad is not None]
             for part in ("model.", "method.")}  # fmt: skip
    got = {k: float(v.detach()) for k, v in losses.items() if k in PINNED[key]}
    got["grad_model"] = float(torch.stack(grads["model."]).norm())
    got["grad_method"] = float(torch.stack(grads["method."]).norm()) if grads["method."] else 0.0
    assert got == pytest.approx(PINNED[key], rel=1e-5, abs=1e-6)
