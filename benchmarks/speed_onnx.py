"""Inference speed of an exported model on onnxruntime against PyTorch eager (the same checkpoint, the same inputs):
interleaved calls (torch, onnxruntime, torch, ...), medians of each, on this CPU with the same thread count.

    python benchmarks/speed_onnx.py CHECKPOINT MODEL.onnx    # MODEL.onnx from `tmtseg export CHECKPOINT --out ...`
    python benchmarks/speed_onnx.py CHECKPOINT MODEL.onnx --size 180 240 --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.modeling.inference import image_scores
from tmtseg.tools.export import OnnxSegmenter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("onnx", help="the export of CHECKPOINT")
    ap.add_argument("--size", type=int, nargs=2, default=[180, 240], help="H W of the input (any size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="timed calls of each, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    trainer, _, _ = model_with_loss_from_checkpoint(args.checkpoint)
    trainer.eval()
    onnx = OnnxSegmenter(args.onnx, threads=args.threads)
    x = (torch.rand(args.batch, 3, *args.size) * 255).round()  # [B, 3, H, W] in 0-255

    def eager() -> torch.Tensor:
        with torch.no_grad():
            return image_scores(trainer.model, x, trainer.method.inference_hooks())

    def ort() -> torch.Tensor:
        return onnx.scores(x)

    diff = (eager() - ort()).abs().max().item()  # also the warm-up call of each
    times: dict[str, list[float]] = {"pytorch eager": [], "onnxruntime": []}
    for _ in range(args.rounds):
        for name, fn in (("pytorch eager", eager), ("onnxruntime", ort)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    load = os.getloadavg()[0]
    print(f"input {args.batch}x3x{args.size[0]}x{args.size[1]}, {args.threads} threads, {args.rounds} rounds,")
    print(f"method {onnx.info['method']}, max |scores diff| {diff:.2e}, load average {load:.1f}")
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    for name, ms in med.items():
        lo, hi = min(times[name]) * 1000, max(times[name]) * 1000
        print(f"  {name:14s} median {ms:8.1f} ms  (min {lo:.1f}, max {hi:.1f})")
    print(f"  onnxruntime / eager: {med['onnxruntime'] / med['pytorch eager']:.2f}x the time")


if __name__ == "__main__":
    main()
