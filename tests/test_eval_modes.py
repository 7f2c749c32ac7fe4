"""Evaluation puts every module that takes part in inference in eval mode itself (issue 31): for every method, two
evaluations of one model give identical numbers even when the caller left it training with dropout, and each
module's mode is the caller's again afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.adapt.registry import METHODS
from tmtseg.config import load_config
from tmtseg.engine.evaluate import evaluate_model_with_loss

from .tiny import TINY


class _Images:
    """Three labelled 64x64 images in the dataset interface `evaluate` reads."""

    num_classes, ignore_index, class_names = 5, 255, [f"c{i}" for i in range(5)]

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.items = [
            {
                "image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 5, (64, 64), generator=g),
            }
            for _ in range(3)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.mark.parametrize("method", list(METHODS))
def test_two_evaluations_of_one_model_are_identical_and_modes_are_restored(method):
    # dropout 0.5 in every discriminator and lambda away from 0: a discriminator left training would move TVT's and
    # TMT's attention from one call to the next
    overrides = [f"adapt.method={method}", "adapt.disc.dropout=0.5", "adapt.tma.lambda_init=0.5"]
    cfg = load_config([], [*TINY, *overrides])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    trainer.train()
    some = list(trainer.modules())[1::3]
    for module in some:  # a mixed state: the caller's, to be given back as it was
        module.training = False
    before = [m.training for m in trainer.modules()]
    data = _Images()
    first = evaluate_model_with_loss(trainer, cfg, data, torch.device("cpu"), progress=False)
    second = evaluate_model_with_loss(trainer, cfg, data, torch.device("cpu"), progress=False)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # nan-safe, to the bit
    assert [m.training for m in trainer.modules()] == before
    assert any(m.training for m in trainer.modules())


def test_a_discriminator_left_training_would_change_tvt_predictions():
    """The test above has teeth: TVT's patch discriminator in train mode (dropout) moves the scores."""
    cfg = load_config([], [*TINY, "adapt.method=tvt", "adapt.disc.dropout=0.5"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    trainer.model.eval()
    trainer.method.train()
    images = _Images()[0]["image"][None]
    with torch.no_grad():
        a = trainer.model(images, hooks=trainer.method.inference_hooks())["pred_masks"]
        b = trainer.model(images, hooks=trainer.method.inference_hooks())["pred_masks"]
    assert not torch.equal(a, b)
