"""The tables of the adaptation methods and their pieces (docs/method.md §6, docs/architecture.md): the CLI, the
config (names, and the `adapt.<section>` settings each piece brings), the bench and the docs read these. A method is a
Recipe of pieces; a piece kind is a builder and the config sections it reads. Adding a method made of existing pieces
is one line in METHODS; a new piece is one file (its class, settings and builder) plus its lines here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tmtseg.adapt import align, attention, bss, regularisers, tuning
from tmtseg.adapt.acte import ACTESettings
from tmtseg.adapt.domain import DiscSettings
from tmtseg.adapt.tma import TMASettings
from tmtseg.registry import Registry


@dataclass(frozen=True)
class Recipe:
    """A method as its pieces, each (name in the method, kind); the names become checkpoint keys method.<name>.*."""

    about: str
    align: tuple[tuple[str, str], ...] = ()  # kinds of ALIGNERS
    attention: tuple[tuple[str, str], ...] = ()  # kinds of ATTENTION_BIASES
    regularisers: tuple[str, ...] = ()  # kinds of REGULARISERS, always on (adapt.<kind>.methods gives them to others)
    tuning: tuple[tuple[str, str], ...] = ()  # kinds of TUNINGS; none = every weight trains


@dataclass(frozen=True)
class Piece:
    make: Callable  # cfg -> the piece
    reads: tuple[str, ...]  # the adapt.* sections `make` reads: a bench run's identity keeps only these
    # regularisers: whether the term acts with these settings (a KL of weight 0 is off), and the config key a missing
    # source model is reported under
    acts: Callable = lambda section: True  # noqa: E731
    needs_key: str = ""


METHODS: Registry[Recipe] = Registry(
    "method",
    {
        "finetune": Recipe("fine-tuning: the segmentation loss on the labelled target split"),
        "lwf": Recipe(
            "LwF / distillation: + the KL to the frozen source model's predictions", regularisers=("preserve",)
        ),
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
        ),
        "bss": Recipe("BSS: + batch spectral shrinkage of the mask features (Chen et al.)", regularisers=("bss",)),
    },
)

ALIGNERS: Registry[Piece] = Registry(
    "aligner",
    {
        "image": Piece(align.build_image, ("disc",)),
        "patch": Piece(align.build_patch, ("disc",)),
        "region": Piece(align.build_region, ("acte", "disc")),
        "region_vit": Piece(align.build_token_region, ("acte", "disc", "tma")),
    },
)
ATTENTION_BIASES: Registry[Piece] = Registry(
    "attention bias",
    {
        "patch": Piece(attention.build_patch_attention, ("tvt",)),
        "tma": Piece(attention.build_tma, ("tma",)),
        "tma_vit": Piece(attention.build_vit_tma, ("tma", "acte")),
    },
)
# in the order their terms are added to the loss
REGULARISERS: Registry[Piece] = Registry(
    "regulariser",
    {
        "preserve": Piece(
            regularisers.build_preserve, ("preserve",), acts=lambda s: s.weight > 0, needs_key="adapt.preserve.weight"
        ),
        "l2sp": Piece(regularisers.build_l2sp, ("l2sp",), needs_key="adapt.l2sp"),
        "bss": Piece(bss.build_bss, ("bss",), acts=lambda s: s.weight > 0, needs_key="adapt.bss"),
    },
)
TUNINGS: Registry[Piece] = Registry(
    "tuning",
    {
        "lora": Piece(tuning.build_lora, ("lora",)),
        "frozen": Piece(tuning.build_frozen, ()),
    },
)

# the `adapt.<name>` settings sections, in the config's order
SECTIONS: Registry[type] = Registry(
    "adapt settings section",
    {
        "disc": DiscSettings,
        "acte": ACTESettings,
        "tma": TMASettings,
        "tvt": attention.TVTSettings,
        "preserve": regularisers.PreserveSettings,
        "l2sp": regularisers.L2SPSettings,
        "lora": tuning.LoRASettings,
        "bss": bss.BSSSettings,
    },
)


@dataclass(frozen=True)
class Alias:
    """A method name that stands for a measured recipe: a method of METHODS plus config overrides."""

    method: str
    overrides: tuple[str, ...]
    why: str  # the line printed when the alias resolves: what it is and the measurement behind it


# resolved by the config loader before validation, so runs, checkpoints and the bench only ever see the recipe
METHOD_ALIASES: dict[str, Alias] = {
    "recommended": Alias(
        "lora",
        ("adapt.preserve.methods=[lora]",),
        "lora + kl: best on the core pairs (ablations bench, 3 seeds), +11.17 mIoU over fine-tuning,"
        " docs/results.md §0.2",
    ),
}


def recipe_of(adapt) -> Recipe:
    """The method's recipe as this config builds it: TMT's ACTE and TMA move into the ViT with adapt.tma.where=vit
    (the same piece names, so the checkpoint keys stay method.acte.* and method.tma.*), or TMA acts in both places
    (the ViT's lambdas then under method.tma_vit.*)."""
    recipe = METHODS.lookup(adapt.method, key="adapt.method")
    where = adapt.tma.where
    if where == "decoder" or ("tma", "tma") not in recipe.attention:
        return recipe
    align = tuple((n, "region_vit" if k == "region" else k) for n, k in recipe.align)
    if where == "vit":
        attention = tuple((n, "tma_vit" if k == "tma" else k) for n, k in recipe.attention)
    else:
        attention = (*recipe.attention, ("tma_vit", "tma_vit"))
    return dataclasses.replace(recipe, align=align, attention=attention)


def regularisers_of(adapt) -> list[str]:
    """The regularisers that act in a run of `adapt` (the config's adapt section): the method's own, and those whose
    adapt.<kind>.methods lists it, if their settings let them act."""
    kinds = [*METHODS[adapt.method].regularisers]
    kinds += [k for k in REGULARISERS if adapt.method in getattr(adapt, k).methods]
    return [k for k, piece in REGULARISERS.items() if k in kinds and piece.acts(getattr(adapt, k))]


def tuning_of(adapt) -> tuple[tuple[str, str], ...]:
    """Which weights train in a run of `adapt`: the method's own tuning pieces, plus LoRA where adapt.lora.methods
    lists the method (like for like: TMT + LoRA against LoRA, i.e. fine-tuning + LoRA, and DANN + LoRA)."""
    own = METHODS[adapt.method].tuning
    if adapt.method in adapt.lora.methods and not any(kind == "lora" for _, kind in own):
        return (*own, ("lora", "lora"))
    return own


# every adapt.* section some alignment or attention piece reads
PIECE_SECTIONS = frozenset(s for p in (*ALIGNERS.values(), *ATTENTION_BIASES.values()) for s in p.reads)


def piece_sections(recipe: Recipe) -> set[str]:
    """The adapt.* sections that the alignment and attention pieces of a method read."""
    return {s for _, kind in recipe.align for s in ALIGNERS[kind].reads} | {
        s for _, kind in recipe.attention for s in ATTENTION_BIASES[kind].reads
    }
