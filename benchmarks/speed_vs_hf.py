"""Benchmark: tmtseg's segmenter against HuggingFace transformers' Mask2Former on CPU, in one run.

Training throughput (forward + loss + backward + AdamW step), inference throughput (eval, no_grad) and peak memory
of four models built to the same sizes (input, batch, queries, widths, decoder depth, loss points):

  ours-fpn       tmtseg, the default light FPN pixel decoder
  ours-msdeform  tmtseg with model.pixel_decoder=msdeform (Mask2Former's deformable pixel decoder)
  hf-vit         HF Mask2Former with OUR ViT + simple feature pyramid put in place of its backbone: identical backbone,
                 so the ratio measures the pixel decoder, transformer decoder and loss implementations
  hf-swin        stock HF Mask2Former on a small random-init Swin (depths 1-1-3-1 = 6 blocks like our ViT, widths
                 48-96-192-384, 192 = our ViT width at stride 16)

Steps are interleaved model by model (A, B, C, D, A, B, ...; each round starts with another model) and medians are
reported, because the machine is shared; ratios pair steps run back to back. Peak memory is measured in a fresh
subprocess per (model, phase).

    .venv/bin/python benchmarks/speed_vs_hf.py            # ~4 min on an idle 2-core machine
    .venv/bin/python benchmarks/speed_vs_hf.py --quick    # ~1.5 min smoke run
Needs the `bench` extra: pip install 'transformers>=4.40'.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("ours-fpn", "ours-msdeform", "hf-vit", "hf-swin")
OURS, THEIRS = ("ours-fpn", "ours-msdeform"), ("hf-vit", "hf-swin")
THREADS = 2
SWIN = {"embed_dim": 48, "depths": [1, 1, 3, 1], "num_heads": [1, 2, 3, 6], "window_size": 7}
MIN_ROUNDS = 3  # the time budget never cuts the throughput rounds below this
TARGET = 1.5  # the goal: our training throughput >= 1.5x HF's
SHARED = "shared-backbone"  # timed beside hf-vit: the ceiling of ours/hf-vit with a decoder and loss that cost nothing


@dataclass
class Subject:
    name: str
    model: nn.Module
    train_step: Callable[[], None]
    forward: Callable[[], None]  # eval-mode forward under the caller's grad mode

    def infer_step(self) -> None:
        with torch.no_grad():
            self.forward()


def load_cfg(args):
    from tmtseg.config import load_config

    overrides = [f"data.batch_size={args.batch}", f"data.crop_size=[{args.size[0]},{args.size[1]}]", *args.overrides]
    return load_config([args.config], overrides)


def make_batch(cfg, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random uint8 images [B, 3, H, W] and blocky street-like labels [B, H, W]: 6-9 classes per image, some void."""
    g = torch.Generator().manual_seed(seed)
    B, (H, W), K = cfg.data.batch_size, cfg.data.crop_size, cfg.data.num_classes
    images = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    labels = []
    for _ in range(B):
        present = torch.randperm(K, generator=g)[: int(torch.randint(min(6, K), min(9, K) + 1, (1,), generator=g))]
        cells = present[torch.randint(0, len(present), (5, 7), generator=g)]  # [5, 7] coarse class grid
        lab = torch.nn.functional.interpolate(cells[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
        lab[: H // 20] = cfg.data.ignore_index  # a void strip along the top, as CamVid's unlabelled border
        labels.append(lab)
    return images, torch.stack(labels)  # [B, 3, H, W], [B, H, W]


def make_targets(cfg, labels: Tensor) -> list[dict]:
    from tmtseg.models.criterion import semantic_targets

    return [
        semantic_targets(lab, num_classes=cfg.data.num_classes, ignore_index=cfg.data.ignore_index) for lab in labels
    ]


def adamw(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def make_subject(name: str, model: nn.Module, opt, loss: Callable[[], Tensor], run: Callable[[], object]) -> Subject:
    """A subject whose training step is train mode, `loss()`, backward, optimizer step; whose forward is eval mode,
    `run()` (the caller picks the grad mode)."""

    def train_step() -> None:
        model.train()
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    def forward() -> None:
        model.eval()
        run()

    return Subject(name, model, train_step, forward)


def build_ours(cfg, decoder: str, images: Tensor, targets: list[dict]) -> Subject:
    from tmtseg.config import load_config_over
    from tmtseg.models.build import build_criterion, build_model

    cfg = load_config_over(cfg, [f"model.pixel_decoder={decoder}"])
    model, criterion = build_model(cfg), build_criterion(cfg)
    opt = adamw(cfg, model)
    return make_subject(
        f"ours-{decoder}", model, opt, lambda: criterion(model(images), targets)["loss"], lambda: model(images)
    )


def hf_config(cfg, args):
    """A Mask2FormerConfig with our sizes. HF builds `decoder_layers - 1` masked-attention layers, hence the + 1."""
    from transformers import Mask2FormerConfig, SwinConfig

    m = cfg.model
    points = cfg.loss.num_points if args.hf_points == "matched" else 112 * 112
    swin = SwinConfig(
        **SWIN, drop_path_rate=m.backbone.drop_path, out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    return Mask2FormerConfig(
        backbone_config=swin,
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

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            pyramid = backbone(torch.zeros(1, 3, 64, 64))["pyramid"]
        self.channels = [pyramid[s].shape[1] for s in (4, 8, 16, 32)]

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        pyramid = self.backbone(pixel_values)["pyramid"]  # {stride: [B, C, H/s, W/s]}
        return SimpleNamespace(feature_maps=tuple(pyramid[s] for s in (4, 8, 16, 32)))


def build_hf(cfg, args, backbone: str, images: Tensor, targets: list[dict]) -> Subject:
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former

    config = hf_config(cfg, args)
    if backbone == "vit":
        from tmtseg.models.build import build_model

        ours = build_model(cfg).backbone
        own_init = {k: v.clone() for k, v in ours.state_dict().items()}
        adapter = OurBackboneForHF(ours)
        with mock.patch.object(modeling_mask2former, "load_backbone", lambda _config: adapter):
            model = Mask2FormerForUniversalSegmentation(config)
        ours.load_state_dict(own_init)  # HF's post_init re-initialised it; keep exactly our backbone's init
    else:
        model = Mask2FormerForUniversalSegmentation(config)
    mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)
    # HF takes normalised floats (its image processor normalises in the data pipeline); ours normalises inside forward
    pixel_values = (images.float() - mean) / std
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"].long() for t in targets]
    opt = adamw(cfg, model)
    return make_subject(
        f"hf-{backbone}",
        model,
        opt,
        lambda: model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss,
        lambda: model(pixel_values=pixel_values),
    )


def build_shared_backbone(cfg, images: Tensor) -> Subject:
    """The ViT + simple feature pyramid that ours-fpn and hf-vit share, alone (forward, backward of the pyramid's mean,
    AdamW step): the part of a training step no decoder or loss implementation can speed up."""
    from tmtseg.models.build import build_backbone

    backbone = build_backbone(cfg)
    x = images.float() / 255
    return make_subject(
        SHARED,
        backbone,
        adamw(cfg, backbone),
        lambda: sum(f.mean() for f in backbone(x)["pyramid"].values()),
        lambda: backbone(x),
    )


def build_subject(name: str, cfg, args, images: Tensor, targets: list[dict]) -> Subject:
    torch.manual_seed(0)
    if name == SHARED:
        return build_shared_backbone(cfg, images)
    kind, variant = name.split("-")
    if kind == "ours":
        return build_ours(cfg, variant, images, targets)
    return build_hf(cfg, args, variant, images, targets)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_of(subject: Subject) -> nn.Module:
    if subject.name == SHARED:
        return subject.model
    if subject.name.startswith("ours"):
        return subject.model.backbone
    return subject.model.model.pixel_level_module.encoder


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def throughput(subjects: list[Subject], args) -> dict[str, dict[str, list[float]]]:
    """Images/s of every single step, interleaved step by step (A, B, C, D, A, B, ...) so that a burst of load from
    other processes hits every model alike; each round starts with a different model."""
    rates = {s.name: {"train": [], "infer": []} for s in subjects}
    for s in subjects:  # warm-up: first-step allocations, AdamW state, lazy init
        s.train_step()
        s.infer_step()
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
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
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
    """One (model, phase) in this fresh process: peak RSS growth over the state after imports + build + inputs."""
    import resource

    torch.set_num_threads(THREADS)
    cfg = load_cfg(args)
    images, labels = make_batch(cfg)
    name, phase = args.memory_worker
    subject = build_subject(name, cfg, args, images, make_targets(cfg, labels))
    step = subject.train_step if phase == "train" else subject.infer_step
    gc.collect()
    try:  # reset the kernel's peak-RSS mark so that a higher peak during the build cannot hide the phase's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "kernel VmHWM, reset through /proc/self/clear_refs"
        base, peak_kb = _proc_status()["VmRSS"], lambda: _proc_status()["VmHWM"]
    except OSError:  # fallback: ru_maxrss cannot be reset, so a higher peak during the build would hide the phase's
        method = "ru_maxrss growth"
        peak_kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        base = peak_kb()
    for _ in range(args.memory_steps):
        step()
    peak = peak_kb()
    print(json.dumps({"mb": (peak - base) / 1024, "method": method}))


def peak_memory(args) -> dict:
    """{model: {phase: MB}, "method": how it was measured}, each (model, phase) in a fresh subprocess, one by one."""
    out: dict = {}
    passthrough = ["--batch", str(args.batch), "--size", *map(str, args.size), "--config", args.config]
    passthrough += ["--hf-points", args.hf_points, "--memory-steps", str(args.memory_steps), *args.overrides]
    for name in args.models:
        for phase in ("train", "infer"):
            cmd = [sys.executable, __file__, "--memory-worker", name, phase, *passthrough]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker {name}/{phase} failed:\n{res.stderr[-2000:]}")
            result = json.loads(res.stdout.strip().splitlines()[-1])
            out.setdefault(name, {})[phase] = result["mb"]
            out["method"] = result["method"]
            print(f"  {name:<14} {phase:<5} peak RSS growth {out[name][phase]:7.1f} MB", flush=True)
    return out


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def ratio(a: list[float], b: list[float]) -> float:
    """Median over cycles of ours/theirs, each pair measured back to back in one cycle of the step-by-step
    interleaving: a burst of outside load slows both members of a pair, so it cancels in their ratio."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def report(cfg, args, subjects: list[Subject], gflops, rates, memory) -> None:
    import transformers

    m, names = cfg.model, [s.name for s in subjects]
    H, W = cfg.data.crop_size
    print("\n=== tmtseg vs HuggingFace Mask2Former (CPU) ===")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {THREADS} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} visible cores"
    )
    print(
        f"input {args.batch}x3x{H}x{W}, {cfg.data.num_classes} classes, queries {m.num_queries}, "
        f"hidden {m.hidden_dim}, heads {m.nheads}, ffn {m.dim_feedforward}, conv/mask dim {m.conv_dim}/{m.mask_dim}, "
        f"masked-attention layers {m.dec_layers} (HF decoder_layers={m.dec_layers + 1}), "
        f"deformable encoder layers {m.enc_layers} (msdeform, hf-*)"
    )
    hf_points = cfg.loss.num_points if args.hf_points == "matched" else 112 * 112
    print(
        f"loss: class/mask/dice {cfg.loss.class_weight:g}/{cfg.loss.mask_weight:g}/{cfg.loss.dice_weight:g}, "
        f"deep supervision {cfg.loss.deep_supervision}, points ours {cfg.loss.num_points} / HF {hf_points}; "
        f"AdamW lr {cfg.train.lr:g} wd {cfg.train.weight_decay:g}, no grad clipping"
    )
    b = m.backbone
    print(
        f"backbones: ours & hf-vit = ViT d{b.embed_dim} x{b.depth} blocks h{b.num_heads} patch {b.patch_size} + simple "
        f"feature pyramid; hf-swin = Swin embed {SWIN['embed_dim']} depths {SWIN['depths']} heads {SWIN['num_heads']} "
        f"window {SWIN['window_size']} (all random init)"
    )
    print(
        f"throughput: {args.rounds} rounds x ({args.train_steps} train + {args.infer_steps} infer steps) per model, "
        "interleaved step by step, after 1 warm-up step each; images/s of single steps: median [quartiles]"
    )
    if memory:
        print(
            f"memory: a fresh subprocess per model and phase; peak RSS growth ({memory['method']}) during "
            f"{args.memory_steps} steps over the RSS after imports + model/optimizer build + inputs. Train includes "
            "activations, gradients and AdamW's two state buffers; both include allocator caching.\n"
        )

    def rate_cell(xs: list[float]) -> str:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
        return f"{statistics.median(xs):.2f} [{q1:.2f}-{q3:.2f}]"

    rows = [
        ["params (M)", *[f"{num_params(s.model) / 1e6:.2f}" for s in subjects]],
        ["  backbone params (M)", *[f"{num_params(backbone_of(s)) / 1e6:.2f}" for s in subjects]],
        ["forward GFLOPs/img", *[f"{gflops[n]:.2f}" for n in names]],
        ["train img/s", *[rate_cell(rates[n]["train"]) for n in names]],
        ["infer img/s", *[rate_cell(rates[n]["infer"]) for n in names]],
    ]
    if memory:
        rows += [
            [f"{p} peak RSS growth (MB)", *[f"{memory[n][p]:.0f}" if n in memory else "-" for n in names]]
            for p in ("train", "infer")
        ]
    print(fmt_table(["", *names], rows))

    pairs = [(o, t) for o in OURS for t in THEIRS if o in names and t in names]
    if not pairs:
        return
    print(
        "\nratios ours/theirs (throughput: median of back-to-back paired ratios, > 1 = ours faster; "
        "memory: < 1 = ours smaller)"
    )
    header = ["", "train thr", "infer thr", *(["train mem", "infer mem"] if memory else [])]
    rows = []
    for o, t in pairs:
        row = [f"{o} / {t}", *(f"{ratio(rates[o][p], rates[t][p]):.2f}x" for p in ("train", "infer"))]
        if memory:
            row += [f"{memory[o][p] / max(memory[t][p], 1e-9):.2f}x" for p in ("train", "infer")]
        rows.append(row)
    print(fmt_table(header, rows))
    print(f"\ntarget: our training throughput >= {TARGET}x HF's")
    for o, t in pairs:
        r = ratio(rates[o]["train"], rates[t]["train"])
        print(f"  {o} vs {t}: {r:.2f}x -> {'met' if r >= TARGET else 'NOT met'}")
    if SHARED in names and "hf-vit" in names:
        ceiling = ratio(rates[SHARED]["train"], rates["hf-vit"]["train"])
        share = {o: 1 / ratio(rates[SHARED]["train"], rates[o]["train"]) for o in OURS if o in names}
        print(
            f"ceiling: the shared ViT + pyramid alone trains at {ceiling:.2f}x hf-vit's step, the most any decoder and "
            "loss could reach against hf-vit; its share of our step: "
            + ", ".join(f"{o} {100 * v:.0f}%" for o, v in share.items())
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra a.b=value config overrides, mirrored into the HF config")
    p.add_argument("--config", default=str(REPO / "tmtseg" / "configs" / "camvid.yaml"))
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[160, 224], metavar=("H", "W"), help="multiples of 32")
    p.add_argument("--train-steps", type=int, default=2, help="timed train steps per model per round")
    p.add_argument("--infer-steps", type=int, default=4, help="timed inference steps per model per round")
    p.add_argument("--memory-steps", type=int, default=3, help="steps run in each memory subprocess")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--hf-points",
        choices=("matched", "default"),
        default="matched",
        help="HF train_num_points: matched to loss.num_points, or HF's default 112*112",
    )
    p.add_argument(
        "--budget", type=float, default=360, help=f"seconds of throughput rounds; stops early (>= {MIN_ROUNDS} rounds)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 train step, 2 memory steps")
    p.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(s % 32 for s in args.size):
        p.error("--size: H and W must be multiples of 32 (the coarsest stride; no padding differences between models)")
    if args.quick:
        args.rounds, args.train_steps, args.infer_steps, args.memory_steps = 2, 1, 2, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(THREADS)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg = load_cfg(args)
    images, labels = make_batch(cfg)
    targets = make_targets(cfg, labels)
    names = [*args.models, *([SHARED] if "hf-vit" in args.models else [])]
    subjects = [build_subject(n, cfg, args, images, targets) for n in names]
    gflops = {s.name: forward_gflops(s, args.batch) for s in subjects}
    print(f"throughput ({args.rounds} rounds):", flush=True)
    rates = throughput(subjects, args)
    memory = {}
    if not args.no_memory:
        print("peak memory (one subprocess per model and phase):", flush=True)
        memory = peak_memory(args)
    report(cfg, args, subjects, gflops, rates, memory)
    print(
        f"\ntotal wall time {time.perf_counter() - t0:.0f} s; 1-min load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (this run alone adds ~{THREADS}; more = other processes competing)"
    )


if __name__ == "__main__":
    main()
