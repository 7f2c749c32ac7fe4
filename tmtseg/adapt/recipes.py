"""The one table of adaptation methods: each name and its pieces (method.md §6). Pure data, no torch: the CLI, the
config validation and the bench read the names from here; methods.py builds the pieces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """A method as its pieces, each (name in the method, kind); build_method makes them from the config."""

    about: str
    align: tuple[tuple[str, str], ...] = ()  # kind: image | patch | region
    attention: tuple[tuple[str, str], ...] = ()  # kind: patch | tma
    regularisers: tuple[str, ...] = ()  # always on: preserve | l2sp (adapt.<kind>.methods gives them to others)
    tuning: tuple[tuple[str, str], ...] = ()  # kind: lora | frozen; none = every weight trains


METHODS: dict[str, Recipe] = {
    "finetune": Recipe("fine-tuning: the segmentation loss on the labelled target split"),
    "lwf": Recipe("LwF / distillation: + the KL to the frozen source model's predictions", regularisers=("preserve",)),
    "l2sp": Recipe("L2-SP: + a pull of the weights toward the source model's", regularisers=("l2sp",)),
    "lora": Recipe(
        "LoRA: the ViT frozen, low-rank updates of its attention; decoders trained", tuning=(("lora", "lora"),)
    ),
    "frozen": Recipe("frozen backbone: the ViT frozen, decoders trained", tuning=(("frozen", "frozen"),)),
    "dann": Recipe("DANN-style: + an image-level discriminator behind a GRL", align=(("disc", "image"),)),
    "tvt": Recipe(
        "TVT-style: + patch and global discriminators; attention re-weighted by patch transferability",
        align=(("patch_disc", "patch"), ("global_disc", "image")),
        attention=(("patch_attn", "patch"),),
    ),
    "tmt": Recipe(
        "TMT: + ACTE's region discriminator and TMA in the decoder",
        align=(("acte", "region"),),
        attention=(("tma", "tma"),),
    ),  # fmt: skip
}


def regularisers_of(adapt) -> list[str]:
    """The regularisers that act in a run of `adapt` (an AdaptConfig): the method's own, and those whose
    adapt.<kind>.methods lists it; a KL of weight 0 is off."""
    kinds = [*METHODS[adapt.method].regularisers]
    kinds += [k for k in ("preserve", "l2sp") if adapt.method in getattr(adapt, k).methods]
    return [k for k in ("preserve", "l2sp") if k in kinds and (k != "preserve" or adapt.preserve.weight > 0)]


def tuning_of(adapt) -> tuple[tuple[str, str], ...]:
    """Which weights train in a run of `adapt`: the method's own tuning pieces, plus LoRA where adapt.lora.methods
    lists the method (like for like: TMT + LoRA against LoRA, i.e. fine-tuning + LoRA, and DANN + LoRA)."""
    own = METHODS[adapt.method].tuning
    if adapt.method in adapt.lora.methods and not any(kind == "lora" for _, kind in own):
        return (*own, ("lora", "lora"))
    return own
