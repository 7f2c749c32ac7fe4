"""Builders of the adaptation side: the method of cfg.adapt.method from the tables of tmtseg/adapt/registry.py, and
the module that training, DDP and checkpoints see (segmenter + method + criterion)."""

from __future__ import annotations

from torch import nn

from tmtseg.adapt.method import AdaptationMethod
from tmtseg.adapt.registry import (
    ALIGNERS,
    ATTENTION_BIASES,
    REGULARISERS,
    TUNINGS,
    recipe_of,
    regularisers_of,
    tuning_of,
)
from tmtseg.losses.criterion import SetCriterion
from tmtseg.modeling.build import build_criterion, build_model


def build_method(cfg) -> AdaptationMethod:
    """The method of cfg.adapt.method, its pieces built from their config sections."""
    a = cfg.adapt
    recipe = recipe_of(a)
    return AdaptationMethod(
        name=a.method,
        num_classes=cfg.data.num_classes,
        ignore_index=cfg.data.ignore_index,
        unsupervised=a.unsupervised,
        adv_weight=a.adv_weight,
        max_iter=a.grl_max_iter or cfg.train.iters,
        align={name: ALIGNERS[kind].make(cfg) for name, kind in recipe.align},
        attention={name: ATTENTION_BIASES[kind].make(cfg) for name, kind in recipe.attention},
        tuning={name: TUNINGS[kind].make(cfg) for name, kind in tuning_of(a)},
        regularisers={kind: REGULARISERS[kind].make(cfg) for kind in regularisers_of(a)},
    )


class ModelWithLoss(nn.Module):
    """Segmenter + adaptation method + criterion; `forward(batches, step=)` returns the step's losses. The one module
    DDP wraps and checkpoints hold (keys model.*, method.*); its state dict holds the segmenter as a plain Segmenter
    loads it (a tuning piece with state hooks, LoRA, merges its update into the weights there)."""

    def __init__(self, *, model: nn.Module, method: AdaptationMethod, criterion: SetCriterion):
        super().__init__()
        self.model, self.method, self.criterion = model, method, criterion
        method.attach(model)
        for piece in method.tuning:
            hooks = piece.state_hooks()
            if hooks is not None:
                after_save, before_load = hooks
                self.register_state_dict_post_hook(after_save)
                self.register_load_state_dict_pre_hook(before_load)

    def forward(self, batches: dict[str, dict], *, step: int) -> dict:
        return self.method(self.model, self.criterion, batches, step=step)


def build_model_with_loss(cfg, *, pretrained: bool = True) -> ModelWithLoss:
    """The model-with-loss of cfg.adapt.method; `pretrained=False` skips loading the ViT's pretrained weights (a
    checkpoint is about to replace them)."""
    return ModelWithLoss(
        model=build_model(cfg, pretrained=pretrained), method=build_method(cfg), criterion=build_criterion(cfg)
    )
