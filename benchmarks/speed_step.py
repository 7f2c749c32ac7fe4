"""The training step of the DINOv2-S segmenter against this CPU's limit (issue 12 §3), in one run:

- the GEMM peak: an n x n x n matmul in fp32 and in bf16 (n = 2048), timed in every round beside the steps;
- the step's FLOPs, forward + backward, counted with torch.utils.flop_counter.FlopCounterMode (matmuls,
  convolutions, attention; elementwise ops count 0), in total and per part;
- the step time in fp32 and in bf16 autocast (train.amp=bf16), in interleaved rounds, medians; the achieved FLOP/s
  as a share of the same run's GEMM peak of that precision; with --compile also the compiled step (train.compile)
  and its compile time;
- where the time goes: torch.profiler over a few steps of each mode, grouped by the `tmtseg.*` ranges the code
  labels: backbone, pixel decoder, transformer decoder, matcher, point sampling, the rest of the criterion, the
  backward (split by the part whose forward recorded each autograd node), the optimizer (with gradient clipping).

The step is the library's own (`engine.train_step` on the trainer of `finetune`: its criterion, gradient clipping,
AdamW with the config's parameter groups and frozen blocks) on the model of tmtseg/configs/camvid.yaml with random
weights, on a random CamVid-like batch.

    .venv/bin/python benchmarks/speed_step.py                        # 160x224, batch 4, 2 threads: ~3 min idle
    .venv/bin/python benchmarks/speed_step.py --compile              # + the compiled steps (inductor: minutes more)
    .venv/bin/python benchmarks/speed_step.py --quick --threads 1    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from speed_common import CAMVID, flop_counter, fmt_table, gemm_gflops, load_cfg, machine_line, make_batch, median_cell

# the targets: the whole step's achieved FLOP/s as a share of the same run's GEMM peak
TARGET = {"fp32": 0.65, "bf16": 0.45}
# profiled ranges (tmtseg/models/segmenter.py, criterion.py, engine.py) -> rows of the table
FORWARD = {
    "tmtseg.backbone": "backbone",
    "tmtseg.pixel_decoder": "pixel decoder",
    "tmtseg.decoder": "transformer decoder",
}
CRITERION = {"tmtseg.matcher": "matcher", "tmtseg.point_sampling": "point sampling"}
COMPILED_REGION = "Torch-Compiled Region"  # the profiler's name of a compiled graph's run
# FlopCounterMode's module names of the parts
FLOP_PARTS = {
    "backbone": "ModelWithLoss.model.backbone",
    "pixel decoder": "ModelWithLoss.model.pixel_decoder",
    "transformer decoder": "ModelWithLoss.model.decoder",
    "criterion": "ModelWithLoss.criterion",
}


@dataclass
class Mode:
    name: str  # fp32 | bf16 | fp32+compile | bf16+compile
    amp: str  # train.amp
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)
    first: float = 0.0  # the first step's time (compiling, AdamW's state)

    @property
    def precision(self) -> str:
        return self.amp if self.amp == "bf16" else "fp32"


def build(cfg, *, compiled: bool):
    """(trainer, optimizer) as `tmtseg train` builds them (random ViT weights; frozen blocks as the config says)."""
    from tmtseg.adapt.build import build_model_with_loss
    from tmtseg.engine.compiled import compile_model
    from tmtseg.engine.optim import build_optimizer, freeze

    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg, pretrained=False)
    freeze(cfg, trainer)
    if compiled:
        compile_model(trainer.model, backend=cfg.train.compile_backend)
    return trainer, build_optimizer(cfg, trainer)


def make_step(cfg, trainer, optimizer, batches: dict, amp: str) -> Callable[[], None]:
    from tmtseg.engine.step import train_step

    counter = iter(range(10**9))

    def step() -> None:
        _, ok = train_step(
            trainer,
            optimizer,
            batches,
            step=next(counter),
            grad_clip=cfg.train.grad_clip,
            amp=amp,
            device=torch.device("cpu"),
        )
        if not ok:
            raise RuntimeError(f"a non-finite {amp} step: the timing would not be of a real step")

    return step


def count_flops(step: Callable[[], None], forward: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """GFLOPs of one step (forward + backward), and of the forward per part. The parts are counted on a forward
    alone: FlopCounterMode's module tracker books a backward op on every part still on its stack (its per-part
    counts of a whole step add up to 1.5x the total)."""
    counter = flop_counter()
    with counter:
        step()
    total = counter.get_total_flops() / 1e9
    counter = flop_counter()
    with counter:
        forward()
    counts = counter.get_flop_counts()
    return total, {part: sum(counts.get(module, {}).values()) / 1e9 for part, module in FLOP_PARTS.items()}


def _ranges(events, name: str) -> list[tuple[float, float]]:
    return [(e.time_range.start, e.time_range.end) for e in events if e.name == name]


def _total(ranges: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in ranges)


def profile(mode: Mode, steps: int) -> dict[str, float]:
    """Share of the profiled step per row (fractions summing to 1 with "other")."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            mode.step()
        wall = (time.perf_counter() - start) * 1e6  # us, as the profiler's times
    events = prof.events()
    ranges = {name: _ranges(events, name) for name in [*FORWARD, *CRITERION, "tmtseg.criterion", "tmtseg.backward"]}
    ranges["tmtseg.optimizer"] = _ranges(events, "tmtseg.optimizer")
    out = {row: _total(ranges[name]) for name, row in FORWARD.items() if ranges[name]}
    owner = {name: row for name, row in FORWARD.items() if ranges[name]}
    owner[COMPILED_REGION] = "segmenter (compiled)"
    # a compiled segmenter's forward is one graph, where its labels are not: one row
    compiled = sorted((e.time_range.start, e.time_range.end) for e in events if e.name.startswith(COMPILED_REGION))
    outermost = [r for i, r in enumerate(compiled) if not any(s <= r[0] and r[1] <= t for s, t in compiled[:i])]
    if outermost:
        ranges[COMPILED_REGION] = outermost
        out[owner[COMPILED_REGION]] = _total(outermost)
    out.update({row: _total(ranges[name]) for name, row in CRITERION.items()})
    out["criterion (losses)"] = _total(ranges["tmtseg.criterion"]) - sum(out[row] for row in CRITERION.values())
    # the backward of each part: autograd nodes carry the sequence number of the forward op that recorded them
    owner["tmtseg.criterion"] = "criterion"
    part_of: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            for name, row in owner.items():
                if any(s <= e.time_range.start < t for s, t in ranges.get(name, [])):
                    part_of[e.sequence_nr] = row
    backward = _total(ranges["tmtseg.backward"])
    split: dict[str, float] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in part_of:
            row = f"backward: {part_of[e.sequence_nr]}"
            split[row] = split.get(row, 0.0) + e.time_range.elapsed_us()
    out.update(split)
    out["backward: rest"] = backward - sum(split.values())
    out["optimizer (clip + AdamW)"] = _total(ranges["tmtseg.optimizer"])
    out["other (batch, zero_grad, method)"] = wall - sum(out.values())
    return {row: value / wall for row, value in out.items()}


def timed_step(mode: Mode) -> float:
    start = time.perf_counter()
    mode.step()
    return time.perf_counter() - start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra a.b=value config overrides (e.g. train.freeze_blocks=0)")
    p.add_argument("--config", default=str(CAMVID))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (GEMMs + steps of every mode)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[160, 224], metavar=("H", "W"))
    p.add_argument("--gemm", type=int, default=2048, help="n of the n x n x n peak matmul")
    p.add_argument("--gemm-repeats", type=int, default=3, help="timed matmuls per precision per round")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per mode")
    p.add_argument("--compile", action="store_true", help="also the compiled step (train.compile; its compile time)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step, n = 1024, 1 profiled step")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.gemm, args.gemm_repeats, args.profile_steps = 2, 1, 1024, 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg = load_cfg(args.config, batch=args.batch, size=args.size, overrides=args.overrides)
    images, labels = make_batch(cfg)
    batches = {"labelled": {"image": images, "label": labels}}
    trainer, optimizer = build(cfg, compiled=False)
    modes = [Mode(amp, amp, make_step(cfg, trainer, optimizer, batches, amp)) for amp in ("none", "bf16")]
    modes[0].name = "fp32"
    if args.compile:
        c_trainer, c_optimizer = build(cfg, compiled=True)
        for amp in ("none", "bf16"):
            name = f"{'fp32' if amp == 'none' else amp}+compile"
            modes.append(Mode(name, amp, make_step(cfg, c_trainer, c_optimizer, batches, amp)))
    b = cfg.model.backbone
    trainable = sum(p.numel() for p in trainer.parameters() if p.requires_grad) / 1e6
    total = sum(p.numel() for p in trainer.parameters()) / 1e6
    print("=== the training step against the GEMM peak ===")
    print(machine_line(args.threads))
    print(
        f"model of {os.path.relpath(args.config)} (random weights): ViT d{b.embed_dim} x{b.depth} h{b.num_heads} "
        f"patch {b.patch_size} -> token stride {b.token_stride or b.patch_size}, {cfg.model.pixel_decoder} pixel "
        f"decoder, {cfg.model.num_queries} queries, {cfg.model.dec_layers} decoder layers, {cfg.loss.num_points} "
        f"points; train.freeze_blocks={cfg.train.freeze_blocks}: {trainable:.2f} M of {total:.2f} M parameters train"
    )
    print(f"input {args.batch}x3x{args.size[0]}x{args.size[1]}; {args.rounds} rounds x {args.steps} steps per mode")

    for mode in modes:  # the first step: AdamW's state, and the compile of a compiled mode
        mode.first = timed_step(mode)
        print(f"  first {mode.name} step: {mode.first:.2f} s", flush=True)
    gflops, parts = count_flops(modes[0].step, lambda: trainer(batches, step=0))
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        peaks["fp32"] += gemm_gflops(args.gemm, torch.float32, repeats=args.gemm_repeats)
        peaks["bf16"] += gemm_gflops(args.gemm, torch.bfloat16, repeats=args.gemm_repeats)
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            mode.times += [timed_step(mode) for _ in range(args.steps)]
        line = "  ".join(f"{m.name} {statistics.median(m.times[-args.steps :]):.3f} s" for m in modes)
        peak = "/".join(f"{statistics.median(v[-args.gemm_repeats :]):.0f}" for v in peaks.values())
        print(f"  round {r + 1}/{args.rounds}: GEMM fp32/bf16 {peak} GFLOP/s; {line}", flush=True)
    shares = {}
    for mode in modes:
        print(f"  profiling {mode.name} ({args.profile_steps} steps)", flush=True)
        shares[mode.name] = profile(mode, args.profile_steps)
    report(args, modes, gflops, parts, peaks, shares)
    print(
        f"\ntotal wall time {time.perf_counter() - t0:.0f} s; 1-min load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (this run alone adds ~{args.threads}; more = other processes competing)"
    )


def report(args, modes: list[Mode], gflops: float, parts: dict, peaks: dict, shares: dict) -> None:
    peak = {p: statistics.median(v) for p, v in peaks.items()}
    print(
        f"\nGEMM peak ({args.gemm}^3 matmul, median of {len(peaks['fp32'])} over the rounds): fp32 "
        f"{median_cell(peaks['fp32'], '{:.0f}')} GFLOP/s, bf16 {median_cell(peaks['bf16'], '{:.0f}')} GFLOP/s "
        f"(bf16 {peak['bf16'] / peak['fp32']:.2f}x fp32)"
    )
    counted = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
    print(f"step FLOPs (FlopCounterMode): {gflops:.1f} GFLOP forward + backward; the forward's by part: {counted}")
    rows = []
    for m in modes:
        achieved = gflops / statistics.median(m.times)
        share = achieved / peak[m.precision]
        rows.append(
            [
                m.name,
                median_cell(m.times),
                f"{args.batch / statistics.median(m.times):.2f}",
                f"{achieved:.0f}",
                f"{100 * share:.1f}% of {m.precision}",
                f">= {100 * TARGET[m.precision]:.0f}%: {'met' if share >= TARGET[m.precision] else 'NOT met'}",
                f"{m.first - statistics.median(m.times):.1f}" if "compile" in m.name else "-",
            ]
        )
    header = ["mode", "step s median [quartiles]", "img/s", "GFLOP/s", "of GEMM peak", "target", "compile s"]
    print(fmt_table(header, rows))
    by_name = {m.name: statistics.median(m.times) for m in modes}
    speedup = by_name["fp32"] / by_name["bf16"]
    print(f"bf16 step / fp32 step: {speedup:.2f}x faster (the targets need >= 2x: 45% of a peak ~2.3x fp32's)")
    for m in modes:
        if "compile" in m.name:
            eager = "fp32" if m.amp == "none" else "bf16"
            gain, first = by_name[eager] / by_name[m.name], m.first - by_name[m.name]
            pays = first / max(by_name[eager] - by_name[m.name], 1e-9)
            print(
                f"{m.name}: {gain:.2f}x the eager step; its compile ({first:.0f} s) pays back after {pays:.0f} steps"
                if gain > 1
                else f"{m.name}: {gain:.2f}x the eager step: compiling does not pay"
            )

    names = [m.name for m in modes]
    print(
        f"\nwhere the time goes (torch.profiler, {args.profile_steps} steps per mode; share of the profiled step, "
        "and ms of the median unprofiled step at that share):"
    )
    rows = list(dict.fromkeys(r for n in names for r in shares[n]))
    table = []
    for row in rows:
        cells = []
        for n in names:
            share = shares[n].get(row)
            cells.append("-" if share is None else f"{1000 * share * by_name[n]:.0f} ms {100 * share:4.1f}%")
        table.append([row, *cells])
    print(fmt_table(["", *names], table))


if __name__ == "__main__":
    main()
