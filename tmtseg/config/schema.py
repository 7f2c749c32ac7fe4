"""The typed configuration: dataclasses with a reasoned default for every field. YAML files hold overrides only;
`a.b=value` overrides them. The `adapt.<piece>` sections come from the pieces themselves (tmtseg/adapt/registry.py's
SECTIONS), so a new piece brings its settings with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tmtseg.adapt.registry import SECTIONS


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
    # a text file of image names, one a line ('#' starts a comment), e.g. the chosen.txt `tmtseg advise` writes: only
    # these images of the split are kept (a record's name, its image's file name or stem); "" = every image
    files: str = ""
    # a folder of region masks, one <image name>.png per image (255 = labelled), e.g. the masks/ `tmtseg advise
    # --regions` writes: the labels are kept inside the masks only, data.ignore_index elsewhere (the advise bench's
    # simulated region labelling); "" = whole labels
    label_regions: str = ""
    # with label_regions: a folder of pseudo-labels, one <image name>.png per image (class ids, 255 = none), e.g. the
    # pseudo/ `tmtseg advise --regions` writes (the model's own prediction): the pixels outside the regions take them
    # instead of the ignore index, so that the classes the regions leave out stay targets; "" = ignored there
    pseudo_labels: str = ""


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
    name: str = "vit"  # the BACKBONES table's entry (tmtseg/modeling/build.py); the keys below are its settings
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
    # the PIXEL_DECODERS table's entry: fpn (light, the CPU default) | msdeform (Mask2Former's deformable encoder)
    pixel_decoder: str = "fpn"
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
    # Mask2Former's weights (docs/method.md §3)
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
    # torch.compile of the segmenter (its forward; criterion and matcher stay eager); where compiling fails, one
    # warning and eager. Off: a ~5% faster step does not repay a cold compile of minutes in one run (results.md §5.1)
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
    max_skipped_frac: float = 0.1  # nonfinite=skip: a run that skipped more than this share of its steps fails


@dataclass
class InferConfig:
    mode: str = "whole"  # whole (resize by data.scale) | slide (windows of crop_size)
    stride: list[int] = field(default_factory=lambda: [96, 96])  # slide only: window step [H, W]
    # a folder where evaluation keeps the ViT's outputs (tmtseg/modeling/feature_cache.py): runs that score the same
    # images through the same frozen ViT read them instead of computing them ("" = off)
    feature_cache: str = ""


@dataclass
class AdaptBase:
    """adapt.*: the method and what every method shares; each piece's own section is added from its table"""

    method: str = "finetune"  # an entry of the METHODS table (tmtseg/adapt/registry.py)
    unsupervised: bool = False  # True: target labels unused (source labels used instead)
    adv_weight: float = 0.1  # weight of each adversarial loss (TVT's beta = gamma = 0.1)
    # the discriminators' lr = train.lr * this: they start from scratch while the segmenter is only nudged (DANN's
    # 10x for new layers); at 1x they barely learn in a short adaptation and every map reads "transferable"
    head_lr_mult: float = 10.0
    grl_max_iter: int = 0  # GRL ramp length; 0 = train.iters
    source_checkpoint: str = ""  # the source model every method starts from


# the adapt section: what every method shares + one section per piece kind, in the table's order
AdaptConfig = dataclasses.make_dataclass(
    "AdaptConfig",
    [(name, settings, field(default_factory=settings)) for name, settings in SECTIONS.items()],
    bases=(AdaptBase,),
)
AdaptConfig.__module__ = __name__


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
        # whether a run that skipped non-finite steps fails at its end, not what it computes
        "train.max_skipped_frac",
    }
)
