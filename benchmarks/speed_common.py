"""What the speed_*.py benchmarks share: the random CamVid-like batch, the GEMM peak, step timing, tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's tmtseg, whether or not it is installed
CAMVID = REPO / "tmtseg" / "configs" / "camvid.yaml"  # the DINOv2-S task config


def load_cfg(config: str, *, batch: int, size: list[int], overrides: list[str]):
    """The config with the benchmark's batch and input size; random ViT weights (timing needs none, and without a
    pretrained name its architecture keys may be overridden too)."""
    from tmtseg.config import load_config

    fixed = ['model.backbone.pretrained=""', f"data.batch_size={batch}", f"data.crop_size=[{size[0]},{size[1]}]"]
    return load_config([config], [*fixed, *overrides])


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
    from tmtseg.losses.criterion import semantic_targets

    return [
        semantic_targets(lab, num_classes=cfg.data.num_classes, ignore_index=cfg.data.ignore_index) for lab in labels
    ]


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def gemm_gflops(n: int, dtype: torch.dtype, *, repeats: int) -> list[float]:
    """GFLOP/s of `repeats` n x n x n matmuls (2 n^3 FLOPs each) after one warm-up: this CPU's practical peak."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    return [2 * n**3 / timed(lambda: torch.matmul(a, b, out=out)) / 1e9 for _ in range(repeats)]


def median_cell(xs: list[float], fmt: str = "{:.3f}") -> str:
    """median [quartiles] of xs."""
    if not xs:
        return "-"
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(q1)}-{fmt.format(q3)}]"


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        found = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in info]
        flags = f", {'/'.join(found) or 'no bf16 instructions'}"
    except OSError:
        flags = ""
    return (
        f"torch {torch.__version__}, {threads} threads, {cpu_name()}{flags}, {os.cpu_count()} visible cores, "
        f"1-min load average {os.getloadavg()[0]:.2f}"
    )


def flop_counter():
    """torch's FlopCounterMode (matmuls, convolutions, attention; elementwise ops count 0) that also counts the CPU
    attention kernel, which torch 2.13's formula table lacks (on CPU, SDPA would count 0)."""
    from torch.utils import flop_counter as fc

    def as_is(formula):  # the table's formulas take tensors already: not to be wrapped a second time
        def counted(*args, **kwargs):
            return formula(*args, **kwargs)

        counted._get_raw = True
        return counted

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: as_is(fc.sdpa_flop),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: as_is(fc.sdpa_backward_flop),
    }
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)
