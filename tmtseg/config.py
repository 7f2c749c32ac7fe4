"""Typed configuration: dataclasses with a reasoned default for every field.

YAML files hold overrides only; ``a.b=value`` on the command line overrides them. An unknown key
or a value of the wrong type raises :class:`ConfigError` naming the key. ``build_*`` functions
are the only readers of the config; modules take keyword-only arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .recipes import METHODS


@dataclass
class SplitConfig:
    """One selection of labelled images: a dataset kind, a domain and a slice of it."""

    kind: str = "synthetic"  # synthetic | manifest | folder | cityscapes
    dataset: str = ""  # manifest: folder under data.root (camvid-daydusk, polyp-multicenter, retina-vessels, ...)
    path: str = ""  # folder / cityscapes: the dataset directory (relative = from the working directory)
    domain: str = "day"  # manifest: the `domain` column; synthetic: day | dusk; cityscapes: train | val
    roles: list[str] = field(default_factory=list)  # manifest `suggested_role` filter; empty = all roles
    groups: list[str] = field(default_factory=list)  # keep these groups only (CamVid sequence, CHASE child "01")
    start: int = 0  # index range [start, stop) after sorting by file name: splits by order, never at random
    stop: int | None = None  # None = to the end
    num_images: int = 32  # synthetic only: how many scenes
    seed: int = 0  # synthetic only: the scene generator's seed, i.e. which scenes
    # this split's resize factor, 0 = data.scale: datasets of different resolutions in one task (CamVid 480 px wide,
    # BDD100K 1280) are brought to one apparent object size
    scale: float = 0.0


@dataclass
class DataConfig:
    root: str = ""  # manifest datasets live here; "" = ../shared/data beside the working dir or the repo
    num_classes: int = 5  # synthetic scenes: sky, road, building, tree, car
    class_names: list[str] = field(default_factory=list)  # empty = the dataset's own names
    # per dataset (manifest name, or a folder's directory name): {its class: a class_names entry or "ignore"}. Puts
    # datasets with other label sets into this task's classes; every class of a mapped dataset must be listed
    label_map: dict[str, dict[str, str]] = field(default_factory=dict)
    ignore_index: int = 255  # every label format is decoded to this for void / outside the field of view
    binary: bool = False  # a foreground-vs-background task: also report foreground Dice and IoU
    allow_missing_classes: bool = False  # else a class in no training mask is an error: a model never learns it
    max_ignore_share: float = 0.2  # data checks warn above this void share: a class misread as void trains nothing
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=lambda: SplitConfig(seed=1, num_images=16))
    # adapt only: unlabelled images of the other domain, seen by the domain discriminators
    source: SplitConfig = field(default_factory=SplitConfig)
    scale: float = 1.0  # every image (and label) is resized by this factor first: a CPU budget knob
    crop_size: list[int] = field(default_factory=lambda: [128, 128])  # [H, W] training crop after scale
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.5])  # random rescale in training
    hflip: bool = True  # random horizontal flip (no scene here is left/right specific)
    color_jitter: float = 0.2  # brightness/contrast/saturation jitter strength; 0 = off
    batch_size: int = 4  # images per step (per process under DDP)
    num_workers: int = 0  # data-loader workers; 0 keeps CPU runs simple and deterministic


@dataclass
class BackboneConfig:
    # ViT-Tiny-like defaults: the smallest standard ViT, trainable from scratch on a laptop CPU. The real task configs
    # use DINOv2 ViT-S/14 (`pretrained: dinov2_vits14` with its architecture: 384 wide, 12 deep, 6 heads, patch 14,
    # LayerScale, img_size 518); from scratch is `model.backbone.pretrained=""`.
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 16  # any size; a pretrained kernel of another size is resampled FlexiViT-style at load
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth (max rate, linear over depth); off for tiny data
    img_size: int = 224  # grid of the position table (img_size / patch); resized to the input grid at run time
    layerscale: float = 0.0  # LayerScale's initial value; 0 = none (DINOv2 has it: 1e-5 at init, learned values load)
    num_registers: int = 0  # register tokens (DINOv2 "with registers": 4)
    pos_offset: float = 0.0  # position-table interpolation: 0 = size-based (HF / timm); DINOv2's own hub models: 0.1
    pos_antialias: bool = False  # antialiased table shrinking, as DINOv2 with registers (hub and HF) does
    # input pixels per token that the feature pyramid starts from (a power of two; 0 = the patch size, which must
    # then be one). With patch 14, 16 gives the pyramid the true strides 4/8/16/32 (see `fit`).
    token_stride: int = 0
    # how a patch that is not token_stride meets it: resize_input (the image is resized by patch / token_stride
    # before the ViT: exact token grid, 0.77x the tokens at 14 -> 16) | resize_tokens (the ViT sees the image as it
    # is; its token map is resampled to the grid)
    fit: str = "resize_input"
    pretrained: str = ""  # a known name (`tmtseg weights list`: dinov2_vits14) or a ViT checkpoint file; "" = random


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: str = "fpn"  # fpn (light, the CPU default) | msdeform (Mask2Former's deformable encoder)
    conv_dim: int = 128  # pixel-decoder width
    mask_dim: int = 128  # mask-feature width (stride 4)
    enc_layers: int = 2  # msdeform only: deformable encoder layers (Mask2Former uses 6)
    hidden_dim: int = 128  # transformer-decoder width
    num_queries: int = 32  # Mask2Former uses 100 for 150 classes; a few per class suffices here
    nheads: int = 4
    dec_layers: int = 6  # two rounds over the three scales (Mask2Former: 9)
    dim_feedforward: int = 512
    dropout: float = 0.0  # Mask2Former trains with 0
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # ImageNet, 0-255
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class LossConfig:
    # Mask2Former's weights (method.md §3)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 4096  # Mask2Former samples 112*112; 4096 keeps the CPU step cheap
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True  # a loss on every decoder layer's prediction


@dataclass
class TrainConfig:
    iters: int = 300
    lr: float = 2e-4
    backbone_lr_mult: float = 1.0  # the ViT's lr (not the pyramid's, which starts fresh) = lr * this
    layer_decay: float = 1.0  # layer-wise lr decay: ViT block i of n gets decay^(n - i), the embeddings decay^(n + 1)
    freeze_blocks: int = 0  # the patch embedding and the first N ViT blocks get no gradient; -1 = the whole ViT
    weight_decay: float = 0.05
    warmup_iters: int = 20  # linear warmup, then poly decay
    poly_power: float = 0.9
    grad_clip: float = 1.0  # max total grad norm; 0 = off
    amp: str = "none"  # none | bf16 (autocast)
    # torch.compile of the segmenter for training and evaluation (its forward; the criterion and the Hungarian matcher
    # stay eager); where compiling fails, one warning and eager. Off by default, as it does not pay within a run here:
    # the compiled DINOv2-S step is 1.05x the eager one (bf16 0.352 -> 0.337 s, fp32 0.524 -> 0.497 s; results.md
    # §5.1), while inductor's first compile takes minutes on a CPU (one busy thread: 155 s for the training graph, 64 s
    # more for evaluation's), 4-6 s with a warm cache, against 0.015 s (bf16) to 0.027 s (fp32) saved a step: 5-22 s
    # over a source model's 300-800 steps, 1-2 s over an adaptation's 80
    compile: bool = False
    # inductor (fused generated kernels: the fast one) | aot_eager (the same graph capture and autograd, no code
    # generation: seconds to compile, for tests and for finding a compile problem) | eager (graph capture only)
    compile_backend: str = "inductor"
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    log_every: int = 10
    # jsonl: metrics.jsonl, always written (the source of truth); tensorboard: also <output_dir>/tensorboard/ (scalars,
    # and prediction overlays / transferability maps at each evaluation; pip install 'tmtseg[tensorboard]')
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 100
    keep_last: int = 2  # checkpoints kept besides the best
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does


@dataclass
class InferConfig:
    mode: str = "whole"  # whole (resize by data.scale) | slide (windows of crop_size)
    stride: list[int] = field(default_factory=lambda: [96, 96])  # slide only: window step [H, W]
    # a folder where evaluation keeps the ViT's outputs (tmtseg/models/feature_cache.py): runs that score the same
    # images through the same frozen ViT read them instead of computing them ("" = off)
    feature_cache: str = ""


@dataclass
class ACTEConfig:
    """ACTE (method.md §4)."""

    cell: int = 4  # c: regions start as c x c cells; the paper-style 8 leaves only ~4-12 regions on CPU-size crops
    iters: int = 3  # L: soft-clustering iterations; 0 = fixed square patches
    kappa: float = 10.0  # temperature on the cosine similarity
    feature_stride: int = 8  # which pixel-decoder map clusters: 8 | 16 | 32
    # what ACTE clusters and discriminates: "decoder", the pixel decoder's map at feature_stride (the paper's reading:
    # the adversarial loss then shapes those features), or "vit", the frozen ViT's token map at stride 16 (an
    # extension: docs/results.md §7 found the decoder map's T flattened to 0.96-1.00 by the GRL, uncorrelated with
    # the source model's errors, while TVT's discriminator on the ViT tokens kept a spread)
    features: str = "decoder"


@dataclass
class DiscConfig:
    """The domain discriminators of every aligning method (DANN's image level, TVT's patch and global, ACTE's region
    level): a 3-layer MLP each. One section, so that the methods compare with discriminators of the same size."""

    hidden: int = 256  # DANN's 1024 is for 2048-d ResNet features; our token widths are 192-384
    dropout: float = 0.1


@dataclass
class TVTConfig:
    """TVT-style patch-level alignment (method.md §6)."""

    eps: float = 1e-6  # bias = log(eps + t): finite where a patch reads as certainly one domain (t = 0)


@dataclass
class TMAConfig:
    """TMA (method.md §5)."""

    alpha: float = 0.5  # W = alpha * (1 - T) + (1 - alpha) * U
    combine: str = "mix"  # mix | product
    uncertainty: bool = True  # U on; False = W from transferability alone
    form: str = "additive"  # additive (log bias before softmax) | multiplicative (scale probabilities)
    learn_lambda: bool = True  # lambda_h learnable per head
    lambda_init: float = 0.0  # 0: training starts exactly as vanilla Mask2Former
    # lambda's lr = train.lr * this: Adam moves a parameter by ~lr per step, so at the segmenter's 1e-4 a lambda
    # starting at 0 would stay within 0.01 of vanilla over a 100-step adaptation, i.e. TMA would never act
    lambda_lr_mult: float = 100.0
    eps: float = 1e-6
    at_inference: bool = True  # run ACTE + TMA on target images at test time
    # beta: the mask losses weight each point by 1 + beta * W, "prioritising adaptation" in the loss as well as in the
    # attention (an extension; 0 = the paper's TMA, attention only)
    loss_weight: float = 0.0
    # how W enters an additive bias: "log", lambda * log(eps + W) (the paper's reading); "zscore", lambda times W
    # standardised over each image's keys (an extension: W varies by ~0.01 within an image, docs/results.md §7, so
    # the log bias barely moves attention; standardised, lambda = 1 shifts a key by one spread of W)
    normalize: str = "log"


@dataclass
class PreserveConfig:
    """Source-knowledge preservation (an extension; not in the paper): a KL term that keeps the adapted model's
    semantic prediction close to the frozen source model's: the method `lwf` (LwF / distillation) is fine-tuning
    with it, and the methods listed in `methods` get it too (TMT by default).
    With a transferability map (TMT) each pixel counts by T(p): what the source model knows is kept where the domains
    look alike, and adaptation is free where they do not (method.md §5's "prioritising adaptation in regions with low
    transferability"). weight 0 = off, i.e. the paper's TMT. On the core bench (docs/results.md §3) it is what lifts
    TMT above fine-tuning (+3.1 mIoU over the pairs), and fine-tuning given the same term gains as much."""

    weight: float = 10.0
    methods: list[str] = field(default_factory=lambda: ["tmt"])  # the methods that use it (a control: [finetune])
    images: str = "source"  # source (the unlabelled source batch) | target (the labelled target batch) | both
    weighting: str = "transferability"  # transferability (T(p) where the method has a map; else uniform) | uniform


@dataclass
class L2SPConfig:
    """L2-SP (Li et al., 2018): alpha/2 * |w - w_source|^2 on the weights the source model has (the whole segmenter),
    beta/2 * |w|^2 on the method's new ones (discriminators, TMA's lambda, LoRA factors). The method `l2sp` is
    fine-tuning with it; `methods` gives it to others (like for like: TMT + L2-SP against fine-tuning + L2-SP)."""

    # Li et al. find alpha in 0.01-0.1 best for transfer (0.01 for segmentation) and keep beta = 0.01; the pull is
    # summed over every weight, against a segmentation loss of ~40 (7 deep-supervised layers), so the small end
    alpha: float = 0.01
    beta: float = 0.01
    methods: list[str] = field(default_factory=list)  # other methods that get the term (l2sp has it always)


@dataclass
class LoRAConfig:
    """Parameter-efficient tuning (method `lora`): the ViT frozen, a low-rank update B @ A (scaled by alpha / rank)
    learnt beside each targeted linear layer of its blocks; the pixel decoder and the mask decoder are trained."""

    rank: int = 8  # Hu et al.: r = 4-8 on the attention matches full fine-tuning; tens of target images ask no more
    alpha: float = 8.0  # scale alpha / rank = 1: the update's size does not change with the rank
    targets: list[str] = field(default_factory=lambda: ["qkv"])  # of qkv, proj (attention), fc1, fc2 (MLP)
    methods: list[str] = field(default_factory=list)  # other methods that get LoRA too (lora has it always)


@dataclass
class AdaptConfig:
    method: str = "finetune"  # one of recipes.METHODS: finetune | lwf | l2sp | lora | frozen | dann | tvt | tmt
    unsupervised: bool = False  # True: target labels unused (source labels used instead)
    adv_weight: float = 0.1  # weight of each adversarial loss (TVT's beta = gamma = 0.1)
    # the discriminators' lr = train.lr * this: they start from scratch while the segmenter is only nudged (DANN's
    # 10x for new layers); at 1x they barely learn in a short adaptation and every map reads "transferable"
    head_lr_mult: float = 10.0
    grl_max_iter: int = 0  # GRL ramp length; 0 = train.iters
    source_checkpoint: str = ""  # the source model every method starts from
    disc: DiscConfig = field(default_factory=DiscConfig)
    acte: ACTEConfig = field(default_factory=ACTEConfig)
    tma: TMAConfig = field(default_factory=TMAConfig)
    tvt: TVTConfig = field(default_factory=TVTConfig)
    preserve: PreserveConfig = field(default_factory=PreserveConfig)
    l2sp: L2SPConfig = field(default_factory=L2SPConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class Config:
    name: str = "demo"
    output_dir: str = "runs/demo"  # run folder: config, metrics log, checkpoints, pictures
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


# keys that change how a run is carried out, not what it computes: where and how often things are written, how data
# is loaded (samples are seeded by stream position, not by worker). A resume may change them, and the bench leaves
# them out of a run's identity.
RUN_NEUTRAL = frozenset(
    {
        "name",
        "output_dir",
        "data.num_workers",
        "train.log_every",
        "train.log_to",
        "train.save_every",
        "train.keep_last",
        "infer.feature_cache",
        # what a data check allows or warns about before a run, not what the run computes
        "data.allow_missing_classes",
        "data.max_ignore_share",
        # whether the segmenter runs compiled: the same computation (compiled kernels round differently, as another
        # CPU does, so a resume that switches it is not bitwise the uninterrupted run)
        "train.compile",
        "train.compile_backend",
    }
)


_CHOICES = {
    "data.train.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "data.val.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "data.source.kind": ("synthetic", "manifest", "folder", "cityscapes"),
    "model.pixel_decoder": ("fpn", "msdeform"),
    "model.backbone.fit": ("resize_input", "resize_tokens"),
    "train.amp": ("none", "bf16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nonfinite": ("stop", "skip"),
    "infer.mode": ("whole", "slide"),
    "adapt.acte.feature_stride": (8, 16, 32),
    "adapt.acte.features": ("decoder", "vit"),
    "adapt.tma.normalize": ("log", "zscore"),
    "adapt.tma.combine": ("mix", "product"),
    "adapt.tma.form": ("additive", "multiplicative"),
    "adapt.preserve.images": ("source", "target", "both"),
    "adapt.preserve.weighting": ("transferability", "uniform"),
}


# numeric ranges, checked before anything is built: a value outside them would crash (or silently misbehave) later,
# after data loading or a wasted training step. (low, high, what): bounds inclusive, None = unbounded; ">0" keys
# exclude 0
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.num_classes": (1, None),
    "data.batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.color_jitter": (0, 1),
    "data.max_ignore_share": (0, 1),
    "model.backbone.embed_dim": (1, None),
    "model.backbone.depth": (1, None),
    "model.backbone.num_heads": (1, None),
    "model.backbone.patch_size": (1, None),
    "model.backbone.mlp_ratio": (0, None),
    "model.backbone.drop_path": (0, 1),
    "model.backbone.img_size": (1, None),
    "model.backbone.layerscale": (0, None),
    "model.backbone.num_registers": (0, None),
    "model.backbone.pos_offset": (0, 1),
    "model.backbone.token_stride": (0, None),
    "model.conv_dim": (1, None),
    "model.mask_dim": (1, None),
    "model.enc_layers": (0, None),
    "model.hidden_dim": (1, None),
    "model.num_queries": (1, None),
    "model.nheads": (1, None),
    "model.dec_layers": (1, None),
    "model.dim_feedforward": (1, None),
    "model.dropout": (0, 1),
    "loss.class_weight": (0, None),
    "loss.mask_weight": (0, None),
    "loss.dice_weight": (0, None),
    "loss.no_object_weight": (0, None),
    "loss.num_points": (1, None),
    "loss.oversample_ratio": (1, None),
    "loss.importance_sample_ratio": (0, 1),
    "train.iters": (1, None),
    "train.lr": (0, None),
    "train.backbone_lr_mult": (0, None),
    "train.layer_decay": (0, 1),
    "train.weight_decay": (0, None),
    "train.warmup_iters": (0, None),
    "train.poly_power": (0, None),
    "train.grad_clip": (0, None),
    "train.log_every": (1, None),
    "train.eval_every": (0, None),
    "train.save_every": (1, None),
    "train.keep_last": (0, None),
    "adapt.adv_weight": (0, None),
    "adapt.head_lr_mult": (0, None),
    "adapt.grl_max_iter": (0, None),
    "adapt.acte.cell": (1, None),
    "adapt.acte.iters": (0, None),
    "adapt.acte.kappa": (0, None),
    "adapt.disc.hidden": (1, None),
    "adapt.disc.dropout": (0, 1),
    "adapt.tvt.eps": (0, None),
    "adapt.l2sp.alpha": (0, None),
    "adapt.l2sp.beta": (0, None),
    "adapt.lora.rank": (1, None),
    "adapt.lora.alpha": (0, None),
    "adapt.tma.alpha": (0, 1),
    "adapt.tma.lambda_lr_mult": (0, None),
    "adapt.tma.eps": (0, None),
    "adapt.tma.loss_weight": (0, None),
    "adapt.preserve.weight": (0, None),
}
# ... and of these, 0 itself is refused too (a zero learning rate trains nothing; a zero scale has no pixels)
_POSITIVE = {
    "train.lr",
    "train.layer_decay",
    "data.scale",
    "model.backbone.mlp_ratio",
    "adapt.acte.kappa",
    "adapt.tma.eps",
    "adapt.tvt.eps",
}


def _check_range(key: str, value: float, low: float | None, high: float | None) -> None:
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf
        raise ConfigError(f"config key {key}={value}: must be a finite number")
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"config key {key}={value}: must be > 0")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"config key {key}={value}: must be {bound}")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Check values that types alone do not catch; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key}={value!r}: must be one of {', '.join(map(str, choices))}")
    for key, (low, high) in _RANGES.items():
        _check_range(key, _get(cfg, key), low, high)
    for key in ("data.scale", "adapt.tma.lambda_init"):
        _check_range(key, _get(cfg, key), None, None)
    for key in ("data.crop_size", "data.scale_range", "infer.stride", "model.pixel_mean", "model.pixel_std"):
        for value in _get(cfg, key):
            _check_range(key, value, None, None)
    if len(cfg.infer.stride) != 2 or min(cfg.infer.stride) < 1:
        raise ConfigError(f"config key infer.stride={cfg.infer.stride}: two steps [H, W], each >= 1")
    if len(cfg.model.pixel_mean) != 3 or len(cfg.model.pixel_std) != 3 or min(cfg.model.pixel_std) <= 0:
        raise ConfigError("config keys model.pixel_mean, model.pixel_std: three values each, std > 0")
    if cfg.adapt.method not in METHODS:
        raise ConfigError(f"config key adapt.method={cfg.adapt.method!r}: must be one of {', '.join(METHODS)}")
    for key in ("preserve", "l2sp", "lora"):
        bad = [m for m in getattr(cfg.adapt, key).methods if m not in METHODS]
        if bad:
            raise ConfigError(f"config key adapt.{key}.methods: {bad} not among {', '.join(METHODS)}")
    if not cfg.adapt.lora.targets or not set(cfg.adapt.lora.targets) <= {"qkv", "proj", "fc1", "fc2"}:
        raise ConfigError(f"config key adapt.lora.targets={cfg.adapt.lora.targets}: one or more of qkv, proj, fc1, fc2")
    if cfg.data.num_classes < 1:
        raise ConfigError(f"config key data.num_classes={cfg.data.num_classes}: must be >= 1")
    if cfg.data.class_names and len(cfg.data.class_names) != cfg.data.num_classes:
        raise ConfigError(
            f"config key data.class_names: {len(cfg.data.class_names)} names"
            f" for data.num_classes={cfg.data.num_classes}"
        )
    if len(cfg.data.crop_size) != 2 or min(cfg.data.crop_size) < 32:
        raise ConfigError(f"config key data.crop_size={cfg.data.crop_size}: two sizes [H, W], each >= 32")
    if len(cfg.data.scale_range) != 2 or not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise ConfigError(f"config key data.scale_range={cfg.data.scale_range}: [low, high] with 0 < low <= high")
    if cfg.data.scale <= 0:
        raise ConfigError(f"config key data.scale={cfg.data.scale}: must be > 0")
    for name in ("train", "val", "source"):
        if (split_scale := getattr(cfg.data, name).scale) < 0:
            raise ConfigError(f"config key data.{name}.scale={split_scale}: must be >= 0 (0 = data.scale)")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"config key data.batch_size={cfg.data.batch_size}: must be >= 1")
    if cfg.model.hidden_dim % cfg.model.nheads:
        raise ConfigError(f"config key model.nheads={cfg.model.nheads}: must divide model.hidden_dim")
    b = cfg.model.backbone
    if b.embed_dim % b.num_heads:
        raise ConfigError("config key model.backbone.num_heads: must divide model.backbone.embed_dim")
    stride = b.token_stride or b.patch_size
    if stride not in (4, 8, 16, 32):
        raise ConfigError(
            f"config key model.backbone.token_stride={b.token_stride}: the pyramid starts from a power of two in"
            f" 4..32 (patch_size={b.patch_size}; with patch 14 set token_stride: 16)"
        )
    if b.embed_dim % max(stride // 4, 1):  # the stride-4 level halves the width log2(stride/4) times
        raise ConfigError(f"config key model.backbone.embed_dim={b.embed_dim}: must be divisible by token_stride/4")
    if not -1 <= cfg.train.freeze_blocks <= b.depth:
        raise ConfigError(f"config key train.freeze_blocks={cfg.train.freeze_blocks}: must be in [-1, {b.depth}]")
    from .weights import check_arch

    if bad := check_arch(b.pretrained, dataclasses.asdict(b)):
        raise ConfigError(f"config key {bad[0]}; set the architecture of the pretrained weights")
    if cfg.train.iters < 1:
        raise ConfigError(f"config key train.iters={cfg.train.iters}: must be >= 1")
    if not 0.0 <= cfg.adapt.tma.alpha <= 1.0:
        raise ConfigError(f"config key adapt.tma.alpha={cfg.adapt.tma.alpha}: must be in [0, 1]")
    return cfg


def _schema():
    return OmegaConf.structured(Config)


def _as_config(node) -> Config:
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def _omega_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    return f"config key {key}: {msg}" if key else msg


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- each YAML file in order <- ``a.b=value`` overrides; validated."""
    merged = _schema()
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: {'a folder, not a config file' if p.is_dir() else 'config file not found'}")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) file; a config file is YAML") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        try:
            merged = OmegaConf.merge(merged, data)
            _as_config(merged)  # resolves ${...} interpolations now, so an error names this file
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_omega_message(err)}") from None
    return load_config_over(_as_config(merged), overrides)


def load_config_over(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``a.b=value`` overrides to an existing config (e.g. one read from a checkpoint)."""
    merged = OmegaConf.structured(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            cfg = _as_config(merged)  # resolves ${...} interpolations now, so an error names this override
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_omega_message(err)}") from None
        except yaml.YAMLError as err:  # a YAML tag (!!python/...) in the value: never constructed
            raise ConfigError(f"override {item!r}: not a plain value ({str(err).splitlines()[0]})") from None
    return validate(cfg if overrides else _as_config(merged))  # always a new object, as callers may edit it


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from its saved dict (run folder, checkpoint); unknown keys are errors."""
    try:
        return validate(_as_config(OmegaConf.merge(_schema(), data)))
    except OmegaConfBaseException as err:
        raise ConfigError(_omega_message(err)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b' lines."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in x.keys() | y.keys():
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]}: {x!r} -> {y!r}")

    walk(to_dict(a), to_dict(b), "")
    return sorted(out)
