"""Deployment speed (issue 30): one table per run of CPU inference paths on one model, at each input size and batch:
images/s and ms/image (medians of interleaved repeats), peak memory, and what each path costs in accuracy against
PyTorch eager fp32 (mIoU delta on a checkpoint's evaluation split with --checkpoint; else the argmax agreement on
image-like random frames).

Paths (--paths): eager (PyTorch eager fp32), bf16 (torch.autocast cpu), compile (torch.compile, inductor), ort (ONNX
Runtime fp32, the `tmtseg export` graph), ort-int8 (`--quantize int8`), hf and hf-bf16 (HF transformers'
Mask2Former on its Dinov2Backbone, built as benchmarks/speed_vs_hf.py builds hf-dinov2; random weights, so no
accuracy column). Ours run the deployed model: the decoder's eval fast path and the LayerScale fold. --profile adds
where eager fp32's batch-1 time goes (ViT, pyramid, pixel decoder, mask decoder and the decoder as it was before the
fast path, the final einsum and upsampling).

    .venv/bin/python benchmarks/speed_deploy.py                          # DINOv2-S (configs/camvid.yaml), random
    .venv/bin/python benchmarks/speed_deploy.py --checkpoint RUN/checkpoints/best --eval-images 50
    .venv/bin/python benchmarks/speed_deploy.py --sizes 128x128 --batches 1 --repeats 2 model.backbone.depth=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from deploy_paths import HF, LABELS, PATHS, build, load_model, reset_peak, rss_kb
from speed_common import CAMVID, fmt_table, machine_line, timed


def frames(size: tuple[int, int], batch: int, seed: int = 0) -> torch.Tensor:
    """Image-like uint8 frames [B, 3, H, W] (smooth colours plus noise: pure noise leaves every score tied)."""
    from tmtseg.tools.export import smooth_images

    ims = smooth_images([size] * batch, seed=seed)
    return torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in ims])


def throughput(paths: dict, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each path on x, `repeats` rounds, each round in another order (interleaved)."""
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timed(lambda n=n: paths[n](x)))
    return times


def agreement(paths: dict, size: tuple[int, int], count: int) -> dict[str, float]:
    """Share of pixels with eager fp32's argmax, on `count` frames of `size` (ours only; HF has other weights)."""
    x = frames(size, count, seed=1)
    ref = paths["eager"](x).argmax(1)
    return {n: float((fn(x).argmax(1) == ref).float().mean()) for n, fn in paths.items() if n not in HF}


def miou(paths: dict, cfg, limit: int) -> dict[str, float]:
    """mIoU of each of our paths on the config's data.val, as `tmtseg eval` infers (mode, crop, stride, scale); each
    path's per-class IoU (and Dice on a binary task) against eager fp32's is printed: which classes a path loses."""
    from tmtseg.data import build_dataset
    from tmtseg.metrics import SegMetrics
    from tmtseg.modeling.inference import window_scores

    ds = build_dataset(cfg.data.val, cfg.data, train=False)
    out, ref = {}, None
    for name, fn in paths.items():
        if name in HF:
            continue
        m = SegMetrics(
            num_classes=ds.num_classes, ignore_index=ds.ignore_index, class_names=ds.class_names, binary=cfg.data.binary
        )
        for i in range(min(limit or len(ds), len(ds))):
            item = ds[i]
            label = item["label"]
            kw = {"mode": cfg.infer.mode, "crop": tuple(cfg.data.crop_size), "stride": tuple(cfg.infer.stride)}
            scores = window_scores(fn, item["image"][None], out_size=tuple(label.shape[-2:]), **kw)
            m.update(scores.argmax(1)[0], label)
        got = m.compute()
        ref = ref or got  # eager, the first path
        out[name] = got["mIoU"]
        dice = f", Dice {got['dice']:.2f} ({got['dice'] - ref['dice']:+.2f})" if "dice" in got else ""
        print(f"  {name:<9} mIoU {out[name]:.2f}{dice} on {i + 1} images of data.val", flush=True)
        if got is not ref:
            base = ref["per_class_iou"]
            delta = {c: v - base[c] for c, v in got["per_class_iou"].items() if v is not None and base[c] is not None}
            worst = sorted(delta.items(), key=lambda kv: kv[1])[:4]
            print("    per-class IoU - eager's, the 4 lowest: " + ", ".join(f"{c} {d:+.2f}" for c, d in worst))
    return out


def memory_worker(args) -> None:
    """One (path, size, batch) in this fresh process: peak RSS of 2 calls after a warm-up one, over the RSS after
    imports and inputs (so weights, sessions, compiled code and activations count)."""
    torch.set_num_threads(args.threads)
    name, size, batch = args.memory_worker
    x = frames(parse_size(size), int(batch))
    trainer, cfg = load_model(args)
    base = rss_kb()["VmRSS"]
    fn = build(name, trainer, cfg, onnx_dir=Path(args.onnx_dir), threads=args.threads)
    fn(x)
    if not reset_peak():
        print(json.dumps({"mb": None}))
        return
    for _ in range(2):
        fn(x)
    print(json.dumps({"mb": (rss_kb()["VmHWM"] - base) / 1024}))


def peak_memory(args, name: str, size: str, batch: int) -> float | None:
    passthrough = ["--threads", str(args.threads), "--config", args.config, "--onnx-dir", args.onnx_dir]
    passthrough += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    cmd = [sys.executable, __file__, "--memory-worker", name, size, str(batch), *passthrough, *args.overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"  memory worker {name} {size} x{batch} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["mb"]


def profile(trainer, size: tuple[int, int], repeats: int) -> list[list[str]]:
    """Where eager fp32's batch-1 time goes: manual timers on the parts, medians over `repeats` calls; and the decoder
    as it ran before the fast path (every layer's masks at H/4 x W/4, as training runs it) on the same inputs."""
    from deploy_paths import deployed

    from tmtseg.modeling.inference import input_scores

    model, x = deployed(trainer), frames(size, 1)
    parts = {"ViT": model.backbone.vit, "pyramid": model.backbone.pyramid, "pixel decoder": model.pixel_decoder}
    parts["mask decoder (fast path)"] = model.decoder
    spent: dict[str, list[float]] = {k: [] for k in [*parts, "einsum + upsampling", "total", "decoder as before"]}
    starts: dict[str, float] = {}
    saved: dict = {"on": True}

    def stop(key: str, output) -> None:
        if saved["on"]:
            spent[key].append(time.perf_counter() - starts[key])
        if key == "pixel decoder":
            saved["pix"] = output

    for key, module in parts.items():
        module.register_forward_pre_hook(lambda m, a, key=key: starts.__setitem__(key, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, key=key: stop(key, o))
    hooks = trainer.method.inference_hooks()
    with torch.no_grad():
        for i in range(repeats + 1):
            saved["on"] = True
            t0 = time.perf_counter()
            out = model(x, hooks=hooks)
            t1 = time.perf_counter()
            input_scores(out, x)
            spent["einsum + upsampling"].append(time.perf_counter() - t1)
            spent["total"].append(time.perf_counter() - t0)
            saved["on"], pix = False, saved["pix"]
            t2 = time.perf_counter()
            model.decoder(pix["multi_scale"], pix["mask_features"], all_predictions=True)
            spent["decoder as before"].append(time.perf_counter() - t2)
            if i == 0:  # the warm-up call
                for v in spent.values():
                    v.clear()
    total = statistics.median(spent["total"])
    rows = []
    for key, v in spent.items():
        ms = statistics.median(v) * 1000
        share = "-" if key == "decoder as before" else f"{100 * ms / 1000 / total:.0f}%"
        rows.append([key, f"{ms:.1f}", share])
    return rows


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides (architecture keys too, without weights)")
    p.add_argument("--config", default=str(CAMVID), help="the model's config without --checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint: its model, and its data.val for the mIoU delta")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--sizes", nargs="+", default=["512x512", "360x480"], help="HxW inputs (CamVid: 360x480)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed calls per path, size and batch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--frames", type=int, default=4, help="random frames for the agreement (without --checkpoint)")
    p.add_argument("--eval-images", type=int, default=0, help="images of data.val for the mIoU (0: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="also where eager fp32's batch-1 time goes, per size")
    p.add_argument("--onnx-dir", help="where the exports go (default: a temporary folder); reused if present")
    p.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    tmp = None if args.onnx_dir else tempfile.TemporaryDirectory(prefix="speed_deploy_")
    args.onnx_dir = args.onnx_dir or tmp.name
    Path(args.onnx_dir).mkdir(parents=True, exist_ok=True)
    trainer, cfg = load_model(args)
    print(machine_line(args.threads), flush=True)
    print("building the paths (the ONNX export takes minutes):", flush=True)
    kw = {"onnx_dir": Path(args.onnx_dir), "threads": args.threads}
    paths = {n: build(n, trainer, cfg, **kw) for n in dict.fromkeys(["eager", *args.paths])}  # eager: the reference
    accuracy = miou(paths, cfg, args.eval_images) if args.checkpoint else {}
    rows = []
    for size in args.sizes:
        hw = parse_size(size)
        agree = {} if args.checkpoint else agreement(paths, hw, args.frames)
        for batch in args.batches:
            x = frames(hw, batch)
            for fn in paths.values():  # warm-up: compiles, allocates, sizes the ORT arenas
                fn(x)
            times = throughput({n: paths[n] for n in args.paths}, x, args.repeats)
            for name in args.paths:
                med = statistics.median(times[name])
                mb = None if args.no_memory else peak_memory(args, name, size, batch)
                if args.checkpoint:
                    acc = "-" if name in HF else f"{accuracy[name] - accuracy['eager']:+.2f}"
                else:
                    acc = "-" if name in HF else f"{100 * agree[name]:.2f}%"
                row = [f"{LABELS[name]}", size, str(batch), f"{batch / med:.2f}", f"{1000 * med / batch:.1f}"]
                rows.append([*row, "-" if mb is None else f"{mb:.0f}", acc])
                print("  " + "  ".join(rows[-1]), flush=True)
    acc_head = "mIoU - eager's" if args.checkpoint else "argmax = eager's"
    header = ["path", "HxW", "batch", "images/s", "ms/image", "peak MB", acc_head]
    print(f"\n{fmt_table(header, rows)}")
    print(f"medians of {args.repeats} interleaved calls; peak MB: a fresh process's peak RSS over its RSS at start")
    if args.profile:
        for size in args.sizes:
            print(f"\nwhere eager fp32's time goes at {size}, batch 1 (medians of {args.repeats} calls):")
            print(fmt_table(["part", "ms", "share"], profile(trainer, parse_size(size), args.repeats)))
    load1 = os.getloadavg()[0]
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; load average {load0:.2f} at start, {load1:.2f} at end")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
