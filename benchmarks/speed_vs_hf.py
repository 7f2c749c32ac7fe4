"""Benchmark: tmtseg's DINOv2-S segmenter against HuggingFace transformers' Mask2Former on DINOv2-S, in one run.

Training throughput (forward + loss + backward + AdamW step), inference throughput (eval, no_grad) and peak memory,
in fp32 and in bf16 autocast, of models built to the same sizes (input, queries, widths, decoder depth, loss points)
on the same DINOv2 ViT-S/14 (random init: timing needs no weights), trained alike (the config's frozen ViT blocks):

  ours-fpn       tmtseg on tmtseg/configs/camvid.yaml: DINOv2-S + simple feature pyramid, the light FPN pixel decoder
  ours-msdeform  the same with model.pixel_decoder=msdeform (Mask2Former's deformable pixel decoder, as HF's)
  hf-dinov2      what a user would pick instead: HF Mask2FormerForUniversalSegmentation on transformers' own
                 Dinov2Backbone, given the multi-scale input its pixel decoder expects, built as ours is: the image
                 resized by patch / 16, the last layer's normed tokens, ViTDet's simple feature pyramid (ours)
  hf-vit         HF Mask2Former on OUR ViT + pyramid: identical backbone, so the ratio measures the pixel decoder,
                 transformer decoder and loss implementations
  shared-backbone  the ViT + pyramid that ours-fpn and hf-vit share, alone: the ceiling of ours/hf-vit

Each model runs as <model>/fp32 and <model>/bf16 (one model and optimizer, both modes), and ours-fpn also in its best
mode, ours-fpn/bf16+compile (train.compile, inductor). Steps are interleaved subject by subject (each round starts
with another) and medians are reported, because the machine is shared; ratios pair steps run back to back. Peak
memory is measured in a fresh subprocess per (subject, phase).

    .venv/bin/python benchmarks/speed_vs_hf.py                       # ~15 min on an idle 2-core machine
    .venv/bin/python benchmarks/speed_vs_hf.py --quick --threads 1   # smoke run
Needs the `bench` extra: pip install 'transformers>=4.40'.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
from speed_common import CAMVID, flop_counter, fmt_table, load_cfg, machine_line, make_batch, make_targets, timed
from torch import Tensor, nn

MODELS = ("ours-fpn", "ours-msdeform", "hf-dinov2", "hf-vit")
SHARED = "shared-backbone"  # timed beside hf-vit: the ceiling of ours/hf-vit with a decoder and loss that cost nothing
MODES = ("fp32", "bf16")
BEST = "bf16+compile"  # our best mode (ours-fpn only)
MIN_ROUNDS = 3  # the time budget never cuts the throughput rounds below this
TARGET_SAME, TARGET_BEST = 1.3, 2.0  # the targets: same precision (train, infer), best mode (train)


@dataclass
class Subject:
    name: str  # <model>/<mode>
    model: nn.Module
    train_step: Callable[[], None]
    forward: Callable[[], None]  # eval-mode forward under the caller's grad mode

    def infer_step(self) -> None:
        with torch.no_grad():
            self.forward()

    @property
    def kind(self) -> str:
        return self.name.split("/")[0]

    @property
    def mode(self) -> str:
        return self.name.split("/")[1]


def amp_context(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode.startswith("bf16") else contextlib.nullcontext()


def adamw(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The same plain AdamW for every model (no per-part lr, no clipping): over the parameters that train."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def make_subject(name, model: nn.Module, opt, loss: Callable[[], Tensor], run: Callable[[], object]) -> Subject:
    """Training step: train mode, `loss()` (under bf16 autocast in a bf16 mode), backward, optimizer step; forward:
    eval mode, `run()` (the caller picks the grad mode)."""
    mode = name.split("/")[1]

    def train_step() -> None:
        model.train()
        with amp_context(mode):
            value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    def forward() -> None:
        model.eval()
        with amp_context(mode):
            run()

    return Subject(name, model, train_step, forward)


def freeze_ours(cfg, vit: nn.Module) -> None:
    """train.freeze_blocks on our VisionTransformer, as `tmtseg train` freezes it."""
    from tmtseg.engine.optim import vit_depth_from_top

    n, depth = cfg.train.freeze_blocks, cfg.model.backbone.depth
    for name, p in vit.named_parameters():
        if n == -1 or (n > 0 and depth - vit_depth_from_top(cfg, "model.backbone.vit." + name) < n):
            p.requires_grad_(False)


def freeze_hf(cfg, dinov2: nn.Module) -> None:
    """train.freeze_blocks on HF's Dinov2Backbone: the embeddings and the first N layers (-1: all, with the norm)."""
    n = cfg.train.freeze_blocks
    for name, p in dinov2.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("encoder.layer.") else None
        if n == -1 or (n > 0 and (name.startswith("embeddings.") or (layer is not None and layer < n))):
            p.requires_grad_(False)


def build_ours(cfg, decoder: str, modes: list[str], images: Tensor, targets: list[dict]) -> list[Subject]:
    from tmtseg.config import load_config_over
    from tmtseg.engine.compiled import compile_model
    from tmtseg.modeling.build import build_criterion, build_model

    cfg = load_config_over(cfg, [f"model.pixel_decoder={decoder}"])
    criterion = build_criterion(cfg)
    subjects = []
    eager = [m for m in modes if "compile" not in m]
    groups = ([eager] if eager else []) + [[m] for m in modes if "compile" in m]  # a compiled mode: its own model
    for group in groups:
        torch.manual_seed(0)
        model = build_model(cfg, pretrained=False)
        freeze_ours(cfg, model.backbone.vit)
        if "compile" in group[0]:
            compile_model(model, backend=cfg.train.compile_backend)
        opt = adamw(cfg, model)
        for mode in group:
            loss, run = lambda m=model: criterion(m(images), targets)["loss"], lambda m=model: m(images)
            subjects.append(make_subject(f"ours-{decoder}/{mode}", model, opt, loss, run))
    return subjects


def dinov2_config(cfg):
    """transformers' Dinov2Config with our backbone's sizes: its last layer's normed tokens as the one feature map."""
    from transformers import Dinov2Config

    b = cfg.model.backbone
    return Dinov2Config(
        hidden_size=b.embed_dim,
        num_hidden_layers=b.depth,
        num_attention_heads=b.num_heads,
        mlp_ratio=int(b.mlp_ratio),
        patch_size=b.patch_size,
        image_size=b.img_size,
        layerscale_value=b.layerscale or 1.0,
        drop_path_rate=b.drop_path,
        layer_norm_eps=1e-6,
        out_features=[f"stage{b.depth}"],
        apply_layernorm=True,
        reshape_hidden_states=True,
    )


def hf_config(cfg, args, backbone_config):
    """A Mask2FormerConfig with our sizes. HF builds `decoder_layers - 1` masked-attention layers, hence the + 1. Its
    backbone_config is a record only: the backbone is put in place of the one HF would build."""
    from transformers import Mask2FormerConfig

    m = cfg.model
    points = cfg.loss.num_points if args.hf_points == "matched" else 112 * 112
    return Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=cfg.data.num_classes,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        feature_size=m.conv_dim,
        mask_feature_size=m.mask_dim,
        decoder_layers=m.dec_layers + 1,
        num_attention_heads=m.nheads,
        dim_feedforward=m.dim_feedforward,
        encoder_layers=m.enc_layers,
        encoder_feedforward_dim=m.dim_feedforward,
        dropout=m.dropout,
        class_weight=cfg.loss.class_weight,
        mask_weight=cfg.loss.mask_weight,
        dice_weight=cfg.loss.dice_weight,
        no_object_weight=cfg.loss.no_object_weight,
        train_num_points=points,
        oversample_ratio=cfg.loss.oversample_ratio,
        importance_sample_ratio=cfg.loss.importance_sample_ratio,
        use_auxiliary_loss=cfg.loss.deep_supervision,
    )


class OurBackboneForHF(nn.Module):
    """Our ViT + simple feature pyramid behind HF's backbone interface (`.channels`, `.feature_maps`)."""

    def __init__(self, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        self.backbone, self.channels = backbone, [channels] * 4

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        pyramid = self.backbone(pixel_values)["pyramid"]  # {stride: [B, C, H/s, W/s]}
        return SimpleNamespace(feature_maps=tuple(pyramid[s] for s in (4, 8, 16, 32)))


class HFDinov2Pyramid(nn.Module):
    """transformers' Dinov2Backbone under our simple feature pyramid, fed as our ViTBackbone feeds its ViT: the image
    resized by patch / token_stride (one token per 16 px with patch 14), the last layer's normed tokens as a map."""

    def __init__(self, dinov2: nn.Module, pyramid: nn.Module, *, patch: int, token_stride: int, channels: int):
        super().__init__()
        self.dinov2, self.pyramid = dinov2, pyramid
        self.patch, self.token_stride, self.channels = patch, token_stride, [channels] * 4

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        H, W = pixel_values.shape[-2:]
        h, w = H // self.token_stride, W // self.token_stride
        x = nn.functional.interpolate(
            pixel_values, size=(h * self.patch, w * self.patch), mode="bilinear", align_corners=False
        )  # [B, 3, h*p, w*p]
        grid = self.dinov2(x).feature_maps[-1]  # [B, C, h, w]
        pyramid = self.pyramid(grid)  # {stride: [B, Cb, H/s, W/s]}
        return SimpleNamespace(feature_maps=tuple(pyramid[s] for s in (4, 8, 16, 32)))


def build_hf(cfg, args, backbone: str, modes: list[str], images: Tensor, targets: list[dict]) -> list[Subject]:
    from transformers import Dinov2Backbone, Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former

    from tmtseg.modeling.backbones.vit import SimpleFeaturePyramid
    from tmtseg.modeling.build import build_backbone

    torch.manual_seed(0)
    b = cfg.model.backbone
    if backbone == "vit":
        ours = build_backbone(cfg, pretrained=False)
        freeze_ours(cfg, ours.vit)
        adapter = OurBackboneForHF(ours, cfg.model.conv_dim)
    else:
        dinov2 = Dinov2Backbone(dinov2_config(cfg))
        freeze_hf(cfg, dinov2)
        stride = b.token_stride or b.patch_size
        pyramid = SimpleFeaturePyramid(in_dim=b.embed_dim, out_dim=cfg.model.conv_dim, in_stride=stride)
        adapter = HFDinov2Pyramid(dinov2, pyramid, patch=b.patch_size, token_stride=stride, channels=cfg.model.conv_dim)
    own_init = {k: v.clone() for k, v in adapter.state_dict().items()}
    with mock.patch.object(modeling_mask2former, "load_backbone", lambda _config: adapter):
        model = Mask2FormerForUniversalSegmentation(hf_config(cfg, args, dinov2_config(cfg)))
    adapter.load_state_dict(own_init)  # HF's post_init re-initialised it: keep the backbone's own init
    mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)
    # HF takes normalised floats (its image processor normalises in the data pipeline); ours normalises inside forward
    pixel_values = (images.float() - mean) / std
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"].long() for t in targets]
    opt = adamw(cfg, model)
    return [
        make_subject(
            f"hf-{backbone}/{mode}",
            model,
            opt,
            lambda: model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss,
            lambda: model(pixel_values=pixel_values),
        )
        for mode in modes
    ]


def build_shared_backbone(cfg, modes: list[str], images: Tensor) -> list[Subject]:
    """The ViT + simple feature pyramid that ours-fpn and hf-vit share, alone (forward, backward of the pyramid's mean,
    AdamW step): the part of a training step no decoder or loss implementation can speed up."""
    from tmtseg.modeling.build import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(cfg, pretrained=False)
    freeze_ours(cfg, backbone.vit)
    x = (images.float() - torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(cfg.model.pixel_std).view(
        1, 3, 1, 1
    )
    opt = adamw(cfg, backbone)
    return [
        make_subject(
            f"{SHARED}/{mode}",
            backbone,
            opt,
            lambda: sum(f.float().mean() for f in backbone(x)["pyramid"].values()),
            lambda: backbone(x),
        )
        for mode in modes
    ]


def build_model_subjects(kind: str, modes: list[str], cfg, args, images: Tensor, targets: list[dict]):
    if kind == SHARED:
        return build_shared_backbone(cfg, modes, images)
    side, variant = kind.split("-")
    if side == "ours":
        return build_ours(cfg, variant, modes, images, targets)
    return build_hf(cfg, args, variant, modes, images, targets)


def plan(args) -> dict[str, list[str]]:
    """{model: its modes} of this run."""
    out = {m: list(args.modes) for m in args.models}
    if "hf-vit" in args.models:
        out[SHARED] = list(args.modes)
    if "ours-fpn" in args.models and not args.no_compile:
        out["ours-fpn"].append(BEST)
    return out


def num_params(module: nn.Module, *, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def backbone_of(subject: Subject) -> nn.Module:
    if subject.kind == SHARED:
        return subject.model
    if subject.kind.startswith("ours"):
        return subject.model.backbone
    return subject.model.model.pixel_level_module.encoder


def warm_up(subjects: list[Subject]) -> tuple[list[Subject], dict[str, str], dict[str, tuple[float, float]]]:
    """One train and one infer step each (first-step allocations, AdamW state, lazy init, compiling) -> (the subjects
    that ran, {name: why one failed}, {name: (first train s, first infer s)})."""
    ok, failed, first = [], {}, {}
    for s in subjects:
        try:
            first[s.name] = (timed(s.train_step), timed(s.infer_step))
            ok.append(s)
        except Exception as err:  # e.g. a library's bf16 path that does not run
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            failed[s.name] = f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]
            print(f"  {s.name}: fails ({failed[s.name]}); left out", flush=True)
    return ok, failed, first


def throughput(subjects: list[Subject], args) -> dict[str, dict[str, list[float]]]:
    """Images/s of every single step, interleaved step by step (A, B, C, A, B, ...) so that a burst of load from other
    processes hits every subject alike; each round starts with a different subject."""
    rates = {s.name: {"train": [], "infer": []} for s in subjects}
    start = time.perf_counter()
    for r in range(args.rounds):
        if r >= MIN_ROUNDS and time.perf_counter() - start > args.budget:
            print(f"  time budget of {args.budget:.0f} s spent: stopping after {r} rounds", flush=True)
            args.rounds = r
            break
        order = subjects[r % len(subjects) :] + subjects[: r % len(subjects)]
        for phase, steps in (("train", args.train_steps), ("infer", args.infer_steps)):
            for _ in range(steps):
                for s in order:
                    rates[s.name][phase].append(args.batch / timed(s.train_step if phase == "train" else s.infer_step))
        line = "  ".join(
            f"{n} {statistics.median(v['train'][-args.train_steps :]):.2f}/"
            f"{statistics.median(v['infer'][-args.infer_steps :]):.1f}"
            for n, v in rates.items()
        )
        print(f"  round {r + 1}/{args.rounds} (train/infer img/s, round median): {line}", flush=True)
    return rates


def forward_gflops(subject: Subject, batch: int) -> float:
    """Forward GFLOPs per image as torch's FlopCounterMode counts them (matmuls, convs, SDPA; not grid_sample)."""
    counter = flop_counter()
    with counter:  # grad mode on: FlopCounterMode's module tracker trips over no_grad views of parameters
        subject.forward()
    return counter.get_total_flops() / batch / 1e9


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])  # kB
    return out


def memory_worker(args) -> None:
    """One (subject, phase) in this fresh process: the peak RSS of its steps over the RSS after imports and inputs,
    after one warm-up step (so a compile's transient peak is not counted, its code and caches are)."""
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (imported before the baseline, as by every subject)

    cfg = load_cfg(args.config, batch=args.batch, size=args.size, overrides=args.overrides)
    images, labels = make_batch(cfg)
    targets = make_targets(cfg, labels)
    gc.collect()
    base = _proc_status()["VmRSS"]
    name, phase = args.memory_worker
    kind, mode = name.split("/")
    (subject,) = build_model_subjects(kind, [mode], cfg, args, images, targets)
    step = subject.train_step if phase == "train" else subject.infer_step
    step()
    gc.collect()
    try:  # reset the kernel's peak-RSS mark to the current RSS: the build's and the warm-up's peaks are not the phase's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print(json.dumps({"mb": None, "method": "unavailable: /proc/self/clear_refs not writable"}))
        return
    for _ in range(args.memory_steps):
        step()
    peak = _proc_status()["VmHWM"]
    print(json.dumps({"mb": (peak - base) / 1024, "method": "kernel VmHWM, reset through /proc/self/clear_refs"}))


def peak_memory(args, names: list[str]) -> dict:
    """{subject: {phase: MB}, "method": how it was measured}, each (subject, phase) in a fresh subprocess."""
    out: dict = {}
    passthrough = ["--batch", str(args.batch), "--size", *map(str, args.size), "--config", args.config]
    passthrough += ["--hf-points", args.hf_points, "--memory-steps", str(args.memory_steps)]
    passthrough += ["--threads", str(args.threads), *args.overrides]
    for name in names:
        for phase in ("train", "infer"):
            cmd = [sys.executable, __file__, "--memory-worker", name, phase, *passthrough]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker {name}/{phase} failed:\n{res.stderr[-2000:]}")
            result = json.loads(res.stdout.strip().splitlines()[-1])
            out.setdefault(name, {})[phase] = result["mb"]
            out["method"] = result["method"]
            shown = "n/a" if result["mb"] is None else f"{result['mb']:7.1f} MB"
            print(f"  {name:<22} {phase:<5} peak RSS over the imports: {shown}", flush=True)
    return out


def ratio(a: list[float], b: list[float]) -> float:
    """Median over cycles of ours/theirs, each pair measured back to back in one cycle of the step-by-step
    interleaving: a burst of outside load slows both members of a pair, so it cancels in their ratio."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def rate_cell(xs: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return f"{statistics.median(xs):.2f} [{q1:.2f}-{q3:.2f}]"


def report(cfg, args, subjects, gflops, rates, memory, failed, first) -> None:
    import transformers

    m, b, names = cfg.model, cfg.model.backbone, [s.name for s in subjects]
    H, W = cfg.data.crop_size
    print("\n=== tmtseg vs HuggingFace Mask2Former on DINOv2-S (CPU) ===")
    print(f"{machine_line(args.threads)}, transformers {transformers.__version__}")
    print(
        f"input {args.batch}x3x{H}x{W}, {cfg.data.num_classes} classes, queries {m.num_queries}, "
        f"hidden {m.hidden_dim}, heads {m.nheads}, ffn {m.dim_feedforward}, conv/mask dim {m.conv_dim}/{m.mask_dim}, "
        f"masked-attention layers {m.dec_layers} (HF decoder_layers={m.dec_layers + 1}), deformable encoder layers "
        f"{m.enc_layers} (msdeform, hf-*)"
    )
    hf_points = cfg.loss.num_points if args.hf_points == "matched" else 112 * 112
    print(
        f"loss: class/mask/dice {cfg.loss.class_weight:g}/{cfg.loss.mask_weight:g}/{cfg.loss.dice_weight:g}, deep "
        f"supervision {cfg.loss.deep_supervision}, points ours {cfg.loss.num_points} / HF {hf_points}; AdamW lr "
        f"{cfg.train.lr:g} wd {cfg.train.weight_decay:g}, no grad clipping; train.freeze_blocks="
        f"{cfg.train.freeze_blocks} on every ViT"
    )
    print(
        f"backbones: DINOv2-S-sized ViT d{b.embed_dim} x{b.depth} h{b.num_heads} patch {b.patch_size} LayerScale, "
        f"image resized to one token per {b.token_stride or b.patch_size} px, last layer's tokens -> simple feature "
        "pyramid; ours / hf-vit / shared: tmtseg's ViT; hf-dinov2: transformers' Dinov2Backbone (random init)"
    )
    print(
        f"throughput: {args.rounds} rounds x ({args.train_steps} train + {args.infer_steps} infer steps) per subject, "
        "interleaved step by step, after 1 warm-up step each; images/s of single steps: median [quartiles]"
    )
    if memory:
        print(
            f"memory: a fresh subprocess per subject and phase; peak RSS ({memory['method']}) during "
            f"{args.memory_steps} steps after a warm-up step, over the RSS after imports and inputs: weights, "
            "gradients, AdamW state, activations, allocator caching (and a compiled model's code)"
        )
    for name, why in failed.items():
        print(f"not run: {name}: {why}")
    print()

    header = ["", "params M (training)", "backbone M", "fwd GFLOPs/img", "train img/s", "infer img/s"]
    header += ["first train/infer s", *(["train MB", "infer MB"] if memory else [])]
    rows = []
    for s in subjects:
        n = s.name
        row = [n, f"{num_params(s.model) / 1e6:.2f} ({num_params(s.model, trainable=True) / 1e6:.2f})"]
        row += [f"{num_params(backbone_of(s)) / 1e6:.2f}", f"{gflops[s.kind]:.2f}"]
        row += [rate_cell(rates[n]["train"]), rate_cell(rates[n]["infer"]), f"{first[n][0]:.1f}/{first[n][1]:.1f}"]
        if memory:
            row += [_mb(memory.get(n, {}).get(p)) for p in ("train", "infer")]
        rows.append(row)
    print(fmt_table(header, rows))

    def pair_row(o: str, t: str) -> list[str]:
        row = [f"{o} / {t}", *(f"{ratio(rates[o][p], rates[t][p]):.2f}x" for p in ("train", "infer"))]
        if memory:
            row += [_ratio_mb(memory.get(o, {}).get(p), memory.get(t, {}).get(p)) for p in ("train", "infer")]
        return row

    pairs = [
        (f"{o}/{mode}", f"{t}/{mode}")
        for mode in args.modes
        for o in ("ours-fpn", "ours-msdeform")
        for t in ("hf-dinov2", "hf-vit")
        if f"{o}/{mode}" in names and f"{t}/{mode}" in names
    ]
    best_hf = next((n for n in ("hf-dinov2/bf16", "hf-dinov2/fp32") if n in names), None)
    best = [(f"ours-fpn/{BEST}", best_hf)] if f"ours-fpn/{BEST}" in names and best_hf else []
    if not pairs + best:
        return
    print(
        "\nratios ours/theirs (throughput: median of back-to-back paired ratios, > 1 = ours faster; memory: < 1 = ours "
        "smaller)"
    )
    header = ["", "train thr", "infer thr", *(["train mem", "infer mem"] if memory else [])]
    print(fmt_table(header, [pair_row(o, t) for o, t in pairs + best]))

    print(f"\ntargets: at the same precision, ours-fpn vs hf-dinov2: train and infer >= {TARGET_SAME}x, memory <= HF's")
    for mode in args.modes:
        o, t = f"ours-fpn/{mode}", f"hf-dinov2/{mode}"
        if o not in names or t not in names:
            print(f"  {mode}: not measured ({t if t not in names else o} did not run)")
            continue
        verdicts = []
        for p in ("train", "infer"):
            r = ratio(rates[o][p], rates[t][p])
            verdicts.append(f"{p} {r:.2f}x {'met' if r >= TARGET_SAME else 'NOT met'}")
        if memory:
            for p in ("train", "infer"):
                a, c = memory.get(o, {}).get(p), memory.get(t, {}).get(p)
                if a is not None and c is not None:
                    verdicts.append(f"{p} memory {_ratio_mb(a, c)} {'met' if a <= c else 'NOT met'}")
        print(f"  {mode}: " + ", ".join(verdicts))
    if best:
        o, t = best[0]
        r = ratio(rates[o]["train"], rates[t]["train"])
        print(
            f"  best modes, training: {o} vs {t} (HF's best that runs): {r:.2f}x -> "
            f"{'met' if r >= TARGET_BEST else 'NOT met'} (target >= {TARGET_BEST}x)"
        )
    for mode in args.modes:
        shared, hf_vit = f"{SHARED}/{mode}", f"hf-vit/{mode}"
        if shared in names and hf_vit in names:
            ceiling = ratio(rates[shared]["train"], rates[hf_vit]["train"])
            share = {
                o: 1 / ratio(rates[shared]["train"], rates[f"{o}/{mode}"]["train"])
                for o in ("ours-fpn", "ours-msdeform")
                if f"{o}/{mode}" in names
            }
            print(
                f"ceiling ({mode}): the shared ViT + pyramid alone trains at {ceiling:.2f}x hf-vit's step, the most "
                "any decoder and loss could reach against hf-vit; its share of our step: "
                + ", ".join(f"{o} {100 * v:.0f}%" for o, v in share.items())
            )


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _ratio_mb(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / max(b, 1e-9):.2f}x"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra a.b=value config overrides, mirrored into the HF config")
    p.add_argument("--config", default=str(CAMVID))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[160, 224], metavar=("H", "W"), help="multiples of 32")
    p.add_argument("--train-steps", type=int, default=2, help="timed train steps per subject per round")
    p.add_argument("--infer-steps", type=int, default=4, help="timed inference steps per subject per round")
    p.add_argument("--memory-steps", type=int, default=3, help="steps run in each memory subprocess")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="precisions of every model")
    p.add_argument("--no-compile", action="store_true", help=f"leave out ours-fpn/{BEST}")
    p.add_argument(
        "--hf-points",
        choices=("matched", "default"),
        default="matched",
        help="HF train_num_points: matched to loss.num_points, or HF's default 112*112",
    )
    p.add_argument(
        "--budget", type=float, default=900, help=f"seconds of throughput rounds; stops early (>= {MIN_ROUNDS} rounds)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 train + 1 infer step, 1 memory step")
    p.add_argument("--memory-worker", nargs=2, metavar=("SUBJECT", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(s % 32 for s in args.size):
        p.error("--size: H and W must be multiples of 32 (the coarsest stride; no padding differences between models)")
    if args.quick:
        args.rounds, args.train_steps, args.infer_steps, args.memory_steps = 2, 1, 1, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg = load_cfg(args.config, batch=args.batch, size=args.size, overrides=args.overrides)
    images, labels = make_batch(cfg)
    targets = make_targets(cfg, labels)
    subjects = []
    for kind, modes in plan(args).items():
        subjects += build_model_subjects(kind, modes, cfg, args, images, targets)
    gflops = {}
    for s in subjects:  # per model, on an eager subject (a compiled one would compile here)
        if s.kind not in gflops and "compile" not in s.mode:
            gflops[s.kind] = forward_gflops(s, args.batch)
    print("warm-up (first steps; compiling):", flush=True)
    subjects, failed, first = warm_up(subjects)
    print(f"throughput ({args.rounds} rounds):", flush=True)
    rates = throughput(subjects, args)
    memory = {}
    if not args.no_memory:
        print("peak memory (one subprocess per subject and phase):", flush=True)
        memory = peak_memory(args, [s.name for s in subjects])
    report(cfg, args, subjects, gflops, rates, memory, failed, first)
    print(
        f"\ntotal wall time {time.perf_counter() - t0:.0f} s; 1-min load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (this run alone adds ~{args.threads}; more = other processes competing)"
    )


if __name__ == "__main__":
    main()
