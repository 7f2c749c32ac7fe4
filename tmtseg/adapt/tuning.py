"""Which weights an adaptation trains (docs/method.md §6, parameter-efficient baselines; the Tuning contract of
tmtseg/adapt/base.py): LoRA on the ViT's linear layers, or the ViT frozen. Each piece `attach`es to a built segmenter
before the optimizer and DDP see it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmtseg.settings import setting

_LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass
class LoRASettings:
    """`adapt.lora`: parameter-efficient tuning (method `lora`): the ViT frozen, a low-rank update B @ A (scaled by
    alpha / rank) learnt beside each targeted linear layer of its blocks; the pixel and mask decoders are trained."""

    rank: int = setting(8, low=1)  # Hu et al.: r = 4-8 on the attention matches full fine-tuning
    alpha: float = setting(8.0, low=0)  # scale alpha / rank = 1: the update's size does not change with the rank
    targets: list[str] = setting(factory=lambda: ["qkv"], choices=tuple(_LORA_TARGETS))  # qkv, proj (attn), fc1, fc2
    methods: list[str] = setting(factory=list)  # other methods that get LoRA too (lora has it always)


class LoRA(nn.Module):
    """LoRA (Hu et al., 2021): the ViT frozen; beside each targeted linear layer of its blocks a low-rank update
    y += (alpha / rank) * B(A x), A [r, in] (Kaiming init), B [out, r] (zeros: training starts at the source model).

    Our own ~60 lines rather than peft's inject_adapter_in_model: it swaps each targeted nn.Linear for a LoRA layer that
    holds the original as `base_layer` (keys `qkv.base_layer.weight`, `qkv.lora_A.default.weight`), so the plain
    segmenter could no longer load an adapted checkpoint, and an injected model has none of PeftModel's merging (peft's
    docs, "Adapter injection"): the merge, the key mapping and the exact resume would be ours to write anyway, on top of
    an optional dependency, for two matmuls. Here A and B are the method's parameters (`method.lora.*`), applied by a
    forward hook on the frozen layer, so the segmenter's keys never change; `merged_state` writes W + (alpha / r) B A
    into the checkpoint's segmenter weights (what `tmtseg eval`/`predict` or any plain Segmenter load) and the exact
    frozen W beside it (`method.lora.base.*`), which `unmerge_state` puts back on load: a resume is bitwise exact. The
    frozen weights have requires_grad=False, which DDP skips; every LoRA factor is used in every forward. As fresh
    modules of the method, the factors train at adapt.head_lr_mult x train.lr (engine.optim.lr_mult): B starts at 0."""

    def __init__(self, *, rank: int, alpha: float, targets: list[str]):
        super().__init__()
        self.rank, self.scale, self.targets = rank, alpha / rank, [_LORA_TARGETS[t] for t in targets]
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        self._layers: dict[str, str] = {}  # factor key -> the layer's name in the segmenter
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        vit = model.backbone.vit
        vit.requires_grad_(False)
        for name, layer in vit.named_modules():
            if isinstance(layer, nn.Linear) and any(name.endswith(t) for t in self.targets):
                key = name.replace(".", "_")
                a = torch.empty(self.rank, layer.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and the LoRA reference) initialise A
                self.a[key] = nn.Parameter(a)
                self.b[key] = nn.Parameter(torch.zeros(layer.out_features, self.rank))
                self._layers[key] = f"backbone.vit.{name}"
                self._handles.append(layer.register_forward_hook(self._hook(key)))
        if not self._layers:
            raise RuntimeError(f"lora: no linear layer of the ViT matches {self.targets}")

    def _hook(self, key: str):
        def add_update(layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:  # noqa: ARG001
            x = inputs[0]  # [B, N, in]
            return output + self.scale * F.linear(F.linear(x, self.a[key]), self.b[key])  # [B, N, r] -> [B, N, out]

        return add_update

    def delta(self, key: str) -> Tensor:
        return self.scale * self.b[key] @ self.a[key]  # [out, r] x [r, in] -> [out, in]

    def merged_state(self, state: dict, prefix: str) -> None:
        """In a trainer's state dict: the segmenter's weights with the update merged in, the frozen ones beside."""
        for key, layer in self._layers.items():
            w = state[f"{prefix}model.{layer}.weight"]
            state[f"{prefix}method.lora.base.{key}"] = w
            state[f"{prefix}model.{layer}.weight"] = w + self.delta(key).detach().to(w.dtype)

    def state_hooks(self) -> tuple:
        """The model-with-loss's state dict holds the segmenter with the update merged in (what a plain Segmenter
        loads), the frozen weights beside it; loading puts the frozen ones back."""
        return (
            lambda module, state, prefix, meta: self.merged_state(state, prefix),  # noqa: ARG005
            lambda module, state, prefix, *_: self.unmerge_state(state, prefix),  # noqa: ARG005
        )

    def unmerge_state(self, state: dict, prefix: str) -> None:
        """Before loading a trainer's state dict: the frozen weights back in place of the merged ones."""
        for key, layer in self._layers.items():
            base = state.pop(f"{prefix}method.lora.base.{key}", None)
            if base is not None:
                state[f"{prefix}model.{layer}.weight"] = base


class FrozenBackbone(nn.Module):
    """The ViT frozen (the feature pyramid, pixel decoder and mask decoder train): linear-probing's analogue."""

    def attach(self, model: nn.Module) -> None:
        model.backbone.vit.requires_grad_(False)

    def state_hooks(self) -> None:
        return None


# ------------------------------------------------------------------------------------- builders: the config readers


def build_lora(cfg) -> LoRA:
    return LoRA(rank=cfg.adapt.lora.rank, alpha=cfg.adapt.lora.alpha, targets=cfg.adapt.lora.targets)


def build_frozen(cfg) -> FrozenBackbone:  # noqa: ARG001
    return FrozenBackbone()
