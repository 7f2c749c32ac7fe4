"""What TMT costs: training step time and peak memory of `tmt` against `finetune` on the same batch, inference time
with and without TMA, and ACTE's time and memory as the feature map grows 4x and 16x. `tmt-paper` is TMT without the
preservation term (ACTE + TMA, as the paper describes it); `tmt` (the default) adds the decoder on the source batch and
the frozen source model's forward pass, which reuses the adapted model's ViT tokens when the ViT is frozen (as the
task configs keep it: train.freeze_blocks); the "own ViT" rows switch that off to show what it saves.

Measurements are interleaved (finetune, tmt, finetune, tmt, ...) and medians reported, so that the ratios are taken
side by side in one run on a noisy machine. Peak memory is the largest sum of bytes of live tensors created during the
measured call (a TorchDispatchMode records every new tensor and a finalizer its release): parameters and inputs that
exist beforehand are not counted.

    python benchmarks/speed_tmt_overhead.py            # CamVid CPU config, batch 4
    python benchmarks/speed_tmt_overhead.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref
from pathlib import Path

import torch
from speed_common import timed
from torch.utils._python_dispatch import TorchDispatchMode

from tmtseg.adapt.acte import ACTE
from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config
from tmtseg.engine.optim import freeze

ROOT = Path(__file__).resolve().parents[1]


class PeakLive(TorchDispatchMode):
    """Peak of live tensor storage (bytes) created under the mode: allocations tracked by weak references."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view() and id(t) not in self.live:
                size = t.untyped_storage().nbytes()
                self.live[id(t)] = size
                self.current += size
                self.peak = max(self.peak, self.current)
                # torch keeps a tensor's Python object alive as long as its storage is in use (autograd included)
                weakref.finalize(t, self._release, id(t))
        return out

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _batch(cfg, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, (h, w) = cfg.data.batch_size, cfg.data.crop_size
    return {
        "image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, cfg.data.num_classes, (b, h, w), generator=g),
    }


def _step(trainer, opt, batches, step):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.amp == "bf16"):  # train.amp, as the engine
        losses = trainer(batches, step=step)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()


def train_step_times(cfgs: dict, rounds: int) -> dict:
    cfg = next(iter(cfgs.values()))[0]
    batches = {"labelled": _batch(cfg, 1), "unlabelled": _batch(cfg, 2)}
    runs = {}
    for name, (cfg, use_source, share) in cfgs.items():
        torch.manual_seed(0)
        trainer = build_model_with_loss(cfg)
        freeze(cfg, trainer)  # train.freeze_blocks, as the runner does
        trainer.amp = cfg.train.amp
        if trainer.method.wants_teacher:  # the preservation term's frozen source model (here: the same init)
            trainer.method.set_teacher(copy.deepcopy(trainer.model))
            if not share:  # the teacher runs its own ViT
                trainer.method.preserve.shares_vit = lambda student: False
        opt = torch.optim.AdamW(trainer.parameters(), lr=1e-5)
        b = batches if use_source else {"labelled": batches["labelled"]}
        _step(trainer, opt, b, 0)  # warm-up
        runs[name] = (trainer, opt, b, [])
    for r in range(rounds):
        for trainer, opt, b, times in runs.values():
            t = time.perf_counter()
            _step(trainer, opt, b, r + 1)
            times.append(time.perf_counter() - t)
    out = {}
    for name, (trainer, opt, b, times) in runs.items():
        with PeakLive() as mode:
            _step(trainer, opt, b, rounds + 2)
        out[name] = {"time": statistics.median(times), "peak_mb": mode.peak / 2**20}
    return out


def interleaved_medians(variants: dict, rounds: int) -> dict:
    """Median seconds of each callable, after one warm-up each, timed in turn round after round (a, b, a, b, ...)."""
    for f in variants.values():
        f()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def inference_times(cfg, rounds: int) -> dict:
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg).eval()
    images = _batch(cfg, 3)["image"][:1]
    variants = {
        "without TMA": lambda: trainer.model(images),
        "with TMA": lambda: trainer.model(images, hooks=trainer.method.inference_hooks()),
    }
    return interleaved_medians(variants, rounds)


@torch.no_grad()
def teacher_times(cfg, rounds: int) -> dict:
    """The KL's frozen source model on one batch under train.amp: running its own ViT, or taking the adapted model's
    tokens (what PreserveKL does when both ViTs are the same frozen one)."""
    torch.manual_seed(0)
    model = build_model_with_loss(cfg).model.eval()
    images = _batch(cfg, 4)["image"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.amp == "bf16"):
        f = model(images)["features"]
        tokens = (f["tokens"], f["tokens_hw"])
        variants = {"own ViT": lambda: model(images), "shared ViT tokens": lambda: model(images, vit_tokens=tokens)}
        return interleaved_medians(variants, rounds)


def acte_scaling(cfg, rounds: int) -> list[dict]:
    a = cfg.adapt.acte
    acte = ACTE(
        in_dim=cfg.model.conv_dim,
        cell=a.cell,
        iters=a.iters,
        kappa=a.kappa,
        disc_hidden=cfg.adapt.disc.hidden,
        disc_dropout=cfg.adapt.disc.dropout,
    )
    rows = []
    for factor in (1, 2, 4):  # side x1, x2, x4 -> map area x1, x4, x16
        h, w = 24 * factor, 32 * factor
        x = torch.randn(2, cfg.model.conv_dim, h, w, requires_grad=True)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            out = acte(x, grl_coeff=1.0)
            ACTE.loss(out, True).backward()
            times.append(time.perf_counter() - t)
        with PeakLive() as mode:
            out = acte(x, grl_coeff=1.0)
            ACTE.loss(out, True).backward()
        rows.append(
            {"map": f"{h}x{w}", "pixels": h * w, "time": statistics.median(times), "peak_mb": mode.peak / 2**20}
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "tmtseg" / "configs" / "camvid.yaml"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    base = [args.config]
    cfg_ft = load_config(base, ["adapt.method=finetune"])
    cfg_tmt = load_config(base, ["adapt.method=tmt", "adapt.tma.lambda_init=0.5"])
    cfg_paper = load_config(base, ["adapt.method=tmt", "adapt.tma.lambda_init=0.5", "adapt.preserve.weight=0"])
    cfg_lwf = load_config(base, ["adapt.method=lwf"])
    b, (h, w) = cfg_ft.data.batch_size, cfg_ft.data.crop_size
    print(
        f"config {Path(args.config).name}: batch {b}, crop {h}x{w}, train.freeze_blocks {cfg_ft.train.freeze_blocks}, "
        f"amp {cfg_ft.train.amp}, torch threads {torch.get_num_threads()}, {rounds} interleaved rounds, medians"
    )
    res = train_step_times(
        {
            "finetune": (cfg_ft, False, True),
            "lwf": (cfg_lwf, True, True),
            "lwf, teacher's own ViT": (cfg_lwf, True, False),
            "tmt-paper (target pass only)": (cfg_paper, False, True),
            "tmt-paper (+ source pass)": (cfg_paper, True, True),
            "tmt (+ source pass, preservation)": (cfg_tmt, True, True),
            "tmt, teacher's own ViT": (cfg_tmt, True, False),
        },
        rounds,
    )
    ref = res["finetune"]
    print("\ntraining step (forward + loss + backward + AdamW)")
    print(f"{'method':<34}{'s/step':>9}{'x finetune':>12}{'peak MB':>10}{'x finetune':>12}")
    for name, r in res.items():
        print(
            f"{name:<34}{r['time']:>9.3f}{r['time'] / ref['time']:>12.2f}{r['peak_mb']:>10.1f}"
            f"{r['peak_mb'] / ref['peak_mb']:>12.2f}"
        )
    teacher = teacher_times(cfg_tmt, rounds * 2)
    print("\nthe KL's source-model forward, one batch (s)")
    for k, v in teacher.items():
        print(f"{k:<34}{v:>9.4f}{v / teacher['own ViT']:>12.2f}")
    inf = inference_times(cfg_tmt, rounds * 2)
    print("\ninference, one image (s)")
    for k, v in inf.items():
        print(f"{k:<34}{v:>9.4f}{v / inf['without TMA']:>12.2f}")
    print("\nACTE (clustering + discriminator, forward + backward), batch 2")
    rows = acte_scaling(cfg_tmt, rounds)
    print(f"{'map':<12}{'pixels x':>9}{'s':>9}{'time x':>8}{'peak MB':>9}{'mem x':>7}")
    for r in rows:
        print(
            f"{r['map']:<12}{r['pixels'] / rows[0]['pixels']:>9.0f}{r['time']:>9.4f}{r['time'] / rows[0]['time']:>8.2f}"
            f"{r['peak_mb']:>9.1f}{r['peak_mb'] / rows[0]['peak_mb']:>7.2f}"
        )


if __name__ == "__main__":
    main()
