"""The contracts of the adaptation pieces (docs/architecture.md): what an aligner, an attention bias, a regulariser, a
tuning piece and a method provide. A method is composed of pieces (tmtseg/adapt/method.py); every piece is an
nn.Module (its weights are saved under `method.<name>.*`) except the regularisers, which hold no trained state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

# where a piece reads or acts in the segmenter (tmtseg/modeling/segmenter.py's hook points)
AlignSite = Literal["vit_tokens", "pixel_features"]
BiasSite = Literal["vit", "decoder"]


class DecoderQuery(NamedTuple):
    """What a decoder-side bias sees at one masked cross-attention: the layer, the previous prediction (detached,
    on the padded grid: pred_logits [B, Q, K+1], pred_masks [B, Q, H', W'], or [B, Q, h, w] in eval mode, where the
    decoder predicts the masks that feed a layer at its memory size) and the memory's grid (h, w)."""

    layer: int
    prev: dict
    hw: tuple[int, int]


@runtime_checkable
class Aligner(Protocol):
    """Domain alignment (DANN's image level, TVT's patch level, ACTE's region level): a discriminator behind a GRL.

    `read` sees the input tokens of the last ViT block [B, N, C] (site "vit_tokens") or the segmenter's features dict
    (site "pixel_features") and returns its outputs under `key`; they come back in the segmenter's `out["adapt"]`.
    grl=None means inference (no gradient reversal)."""

    key: str
    site: AlignSite

    def read(self, x, *, grl: Tensor | None) -> dict: ...

    def loss(self, labelled: dict, unlabelled: dict, *, labelled_is_source: bool) -> Tensor:
        """The adversarial loss from the two batches' `adapt` outputs."""
        ...

    def transfer_map(self, adapt: dict, hw: tuple[int, int]) -> Tensor | None:
        """Its transferability map T [B, 1, h', w'] for the image whose pred_masks grid is hw; None if it has none."""
        ...


@runtime_checkable
class AttentionBias(Protocol):
    """A per-key term for attention logits (TVT's patch re-weighting in the ViT, TMA in the decoder) computed from the
    outputs of the aligner whose key it `reads`. `bias` returns (additive bias, multiplicative scale), either None:
    at site "vit" a bias [B, 1 or h, N] for the keys of the ViT blocks it acts on (query: layer -1, prev = the model's
    own unbiased prediction or None, hw = the token grid); at site "decoder" [B, h, h*w] terms of the masked
    cross-attention (query: the DecoderQuery). `loss_weight` > 0: the mask losses weight each point by
    `point_weight` (1 = uniform)."""

    site: BiasSite
    reads: str
    at_inference: bool
    loss_weight: float

    def bias(self, adapt: dict, query: DecoderQuery | None) -> tuple[Tensor | None, Tensor | None]: ...

    def point_weight(self, tmap: Tensor, outputs: dict) -> Tensor: ...


@dataclass
class StepPasses:
    """What a regulariser may read of one training step: the segmenter being adapted, the method, and the forward
    passes of the step by domain ("source" / "target": (images [B, 3, H, W], outputs))."""

    model: nn.Module | None  # None: no adapted segmenter whose ViT tokens the teacher could reuse
    method: Method
    passes: dict[str, tuple[Tensor, dict]]


@runtime_checkable
class Regulariser(Protocol):
    """A term toward the source model (the KL of LwF/TMT, L2-SP) or on the features (BSS), added to the loss.

    `name` is its loss key; `domains` the domains whose full forward pass it reads (a method with the unlabelled
    domain listed runs the decoder on that batch too); `needs_source`: `set_source` gets the frozen source model."""

    name: str
    domains: tuple[str, ...]
    needs_source: bool

    def set_source(self, model: nn.Module) -> None: ...

    def loss(self, step: StepPasses) -> Tensor: ...


@runtime_checkable
class Tuning(Protocol):
    """Which weights train (LoRA, a frozen ViT): `attach` to the built segmenter before the optimizer and DDP see it.
    `state_hooks` gives (after state_dict, before load_state_dict) hooks where the checkpoint stores the segmenter
    otherwise than its modules hold it (LoRA merges its update), or None."""

    def attach(self, model: nn.Module) -> None: ...

    def state_hooks(self) -> tuple | None: ...


@runtime_checkable
class Method(Protocol):
    """An adaptation method: `forward(model, criterion, batches, step=)` returns the step's losses ("loss" is the
    total); `inference_hooks()` the segmenter hooks that run at test time (None: the plain segmenter)."""

    name: str
    needs_unlabelled: bool
    wants_teacher: bool

    def attach(self, model: nn.Module) -> None: ...

    def set_teacher(self, model: nn.Module) -> None: ...

    def inference_hooks(self): ...

    def transferability(self, adapt: dict, hw: tuple[int, int]) -> Tensor | None: ...
