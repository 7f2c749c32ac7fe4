"""A run's identity: the hash of what it computes, which names its folder and finds it among finished runs."""

from __future__ import annotations

import hashlib
import json

from tmtseg import config as config_mod
from tmtseg.adapt.registry import METHODS, PIECE_SECTIONS, REGULARISERS, piece_sections, regularisers_of, tuning_of
from tmtseg.config import Config

# A run's identity is a hash of its resolved config and of this version: bump it when the code computes something
# else for the same config (a fix), so that finished runs are not mistaken for current ones. 2: DINOv2-S sources;
# 3: the keys that only change how a run is carried out (config.RUN_NEUTRAL) are no part of it; 4: a method's config
# sections (adapt.disc, acte, tma, tvt) count only in the runs of methods that have the pieces reading them.
HASH_VERSION = 4

# keys added after runs were hashed, with the value every earlier run had: at that value they are no part of a run's
# identity, so that finished runs are found again (another value is another computation and counts)
ADDED_AT = {
    "model.backbone.name": "vit",
    "adapt.tma.where": "decoder",
    "adapt.tma.vit_blocks": 4,
    "adapt.acte.vit_block": -1,
    "adapt.acte.vit_pool": 1,
    **{
        f"data.{split}.{key}": ""
        for split in ("train", "val", "source")
        for key in ("files", "label_regions", "pseudo_labels")
    },
}


def config_hash(cfg: Config) -> str:
    """What a run computes: the resolved config without the keys that only say how it is carried out (where it is
    written, how often, with how many loader workers: config.RUN_NEUTRAL), with the hash version."""
    d = config_mod.to_dict(cfg)
    for dotted in config_mod.RUN_NEUTRAL:
        *path, last = dotted.split(".")
        section = d
        for part in path:
            section = section.get(part, {})
        section.pop(last, None)  # a key the config does not have (yet) is left out all the same
    for dotted, old in ADDED_AT.items():
        *path, last = dotted.split(".")
        section = d
        for part in path:
            section = section.get(part, {})
        if section.get(last, old) == old:
            section.pop(last, None)
    a = d["adapt"]
    # a piece's section counts only in the runs of methods that have the piece: a source model, fine-tuning or LoRA
    # keep their identity when ACTE, TMA or the discriminators gain a key
    own = METHODS[a["method"]]
    for section in PIECE_SECTIONS - piece_sections(own):
        a.pop(section)
    # a regulariser or a LoRA counts only where it acts (which methods list it is no part of what a run computes)
    acting = regularisers_of(cfg.adapt)
    for kind in REGULARISERS:
        section = a.pop(kind)
        section.pop("methods")
        if kind in acting:
            a[kind] = section
    # a method that is another plus a regulariser (lwf = finetune + KL, l2sp = finetune + L2-SP) is hashed as that
    # one with the regulariser's section: the same computation finds the same run under either name
    # (and one given LoRA by adapt.lora.methods as the one that has it: finetune + LoRA is lora)
    tuning = tuning_of(cfg.adapt)
    same = [n for n, r in METHODS.items() if not r.regularisers and (r.align, r.attention, r.tuning) ==
            (own.align, own.attention, tuning)]  # fmt: skip
    a["method"] = same[0] if same else a["method"]
    lora = a.pop("lora")
    lora.pop("methods")
    if any(kind == "lora" for _, kind in tuning):
        a["lora"] = lora
    return hashlib.sha1(json.dumps({"version": HASH_VERSION, "config": d}, sort_keys=True).encode()).hexdigest()[:10]
