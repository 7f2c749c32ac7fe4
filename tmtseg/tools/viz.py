"""The paper's Fig. 1 panels for a checkpoint: ACTE regions beside equal-sized patches, transferability, uncertainty,
the decoder's attention mask and attention map for chosen queries and layers, prediction beside ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tmtseg.adapt.acte import soft_cluster
from tmtseg.io.pictures import colorize
from tmtseg.modeling.inference import semantic_probs


@dataclass
class Panels:
    """Everything one figure shows, as numpy arrays at image resolution."""

    image: np.ndarray  # [H, W, 3] uint8
    regions: np.ndarray  # [H, W] adaptive region ids
    patches: np.ndarray  # [H, W] fixed-patch ids (L = 0)
    transferability: np.ndarray | None  # [H, W] in [0, 1]; None for a model without ACTE
    uncertainty: np.ndarray  # [H, W] in [0, 1]
    attn: list[tuple[int, int, np.ndarray, np.ndarray]]  # (layer, query, attention map, attention mask) at [H, W]
    pred: np.ndarray  # [H, W] class ids
    label: np.ndarray | None  # [H, W] class ids (ignore kept)


def _up(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """[h, w] -> [H, W] numpy."""
    x = x[None, None].float()
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=size, mode=mode, **kw)[0, 0].cpu().numpy()


def to_image(x: torch.Tensor, padded: tuple[int, int], size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """A map [h, w] on the padded input grid `padded` (what the segmenter's features cover) -> [H, W] numpy on the
    image of `size`: upsampled to the padded grid, then cropped (the padding is bottom/right)."""
    return _up(x, padded, mode=mode)[: size[0], : size[1]]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """[K, h, w] class scores -> normalised entropy [h, w] in [0, 1]."""
    p = probs / probs.sum(0, keepdim=True).clamp_min(1e-12)
    return (-torch.special.xlogy(p, p).sum(0) / np.log(max(p.shape[0], 2))).clamp(0, 1)


@torch.no_grad()
def compute_panels(
    trainer,
    image: torch.Tensor,
    *,
    label: torch.Tensor | None = None,
    cell: int,
    iters: int,
    kappa: float,
    feature_level: int,
    queries: int = 3,
    layers: tuple[int, ...] = (0, -1),
) -> Panels:
    """Run the model once on `image` ([3, H, W] uint8) with its inference hooks and gather the panels."""
    model = trainer.model
    model.eval()
    trainer.method.eval()
    device = next(model.parameters()).device
    hooks = trainer.method.inference_hooks()
    out = model(image[None].to(device), hooks=hooks, return_attn=True)
    size = tuple(image.shape[-2:])
    feats = out["features"]["multi_scale"][feature_level]  # [1, C, h, w] on the padded grid
    stride = -(-image.shape[-2] // feats.shape[-2])  # padded grid -> image: crop after upsampling
    acte_out = out["adapt"].get("acte")  # ACTE's regions and map, where the method has them
    adaptive = acte_out["regions"] if acte_out is not None else soft_cluster(feats, cell=cell, iters=iters, kappa=kappa)
    fixed = soft_cluster(feats, cell=cell, iters=0, kappa=kappa)
    padded = (feats.shape[-2] * stride, feats.shape[-1] * stride)

    def ids(regions) -> np.ndarray:
        return to_image(regions.region_ids()[0], padded, size, mode="nearest").astype(np.int64)

    tmap = None
    if acte_out is not None:
        tmap = to_image(acte_out["tmap"][0, 0], padded, size)
    probs = semantic_probs(out["pred_logits"], out["pred_masks"])[0]  # [K, H/4, W/4]
    pred = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    conf = out["pred_logits"][0].softmax(-1)[:, :-1].max(-1).values  # [Q]
    chosen = conf.topk(min(queries, conf.numel())).indices.tolist()
    attn = []
    for layer in layers:
        layer = layer % len(out["attn"])
        h, w = out["attn_hw"][layer]
        a = out["attn"][layer][0].mean(0)  # [Q, N] averaged over heads
        m = out["attn_masks"][layer][0]  # [Q, N]
        lvl_padded = (h * (padded[0] // h), w * (padded[1] // w))
        for q in chosen:
            amap = to_image(a[q].reshape(h, w), lvl_padded, size)
            mmap = to_image((~m[q]).reshape(h, w).float(), lvl_padded, size, mode="nearest")
            attn.append((layer, q, amap, mmap))
    return Panels(
        image=image.permute(1, 2, 0).cpu().numpy(),
        regions=ids(adaptive),
        patches=ids(fixed),
        transferability=tmap,
        uncertainty=_up(_entropy(probs), size),  # pred_masks are already cropped to the image
        attn=attn,
        pred=pred.cpu().numpy(),
        label=None if label is None else label.cpu().numpy(),
    )


def boundaries(ids: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """[H, W] region ids -> bool [H, W], True where the pixel below or to the right belongs to another region; with
    `valid` (bool [H, W]) only pairs of two valid pixels count (a label's edge to void is no object boundary)."""
    edge = np.zeros(ids.shape, dtype=bool)
    down, right = ids[:-1] != ids[1:], ids[:, :-1] != ids[:, 1:]
    if valid is not None:
        down &= valid[:-1] & valid[1:]
        right &= valid[:, :-1] & valid[:, 1:]
    edge[:-1] |= down
    edge[:, :-1] |= right
    return edge


def _with_edges(image: np.ndarray, ids: np.ndarray, colour=(255, 230, 0)) -> np.ndarray:
    out = image.copy()
    out[boundaries(ids)] = colour
    return out


def draw_figure(
    p: Panels, path: Path, *, palette: np.ndarray, class_names: list[str], ignore_index: int, title: str = ""
) -> Path:
    """One figure per image: two rows of panels with colour bars and a class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("ACTE regions (adaptive)", _with_edges(p.image, p.regions), None),
        ("equal-sized patches", _with_edges(p.image, p.patches), None),
    ]
    if p.transferability is not None:
        panels.append(("transferability T", p.transferability, "viridis"))
    panels.append(("uncertainty U", p.uncertainty, "magma"))
    for layer, q, amap, mmap in p.attn:
        panels.append((f"attn. mask L{layer} q{q}", mmap, "gray"))
        panels.append((f"attn. map L{layer} q{q}", amap, "inferno"))
    panels.append(("prediction", colorize(p.pred, palette), None))
    if p.label is not None:
        panels.append(("ground truth", colorize(p.label, palette, ignore_index=ignore_index), None))
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for ax, (name, arr, cmap) in zip(axes.flat, panels):
        if cmap is None:
            ax.imshow(arr)
        else:
            vmax = 1.0 if name.startswith(("transfer", "uncert", "attn. mask")) else None
            im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    handles = [matplotlib.patches.Patch(color=np.asarray(palette[i]) / 255, label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 11), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_grid(items: list[Panels], path: Path, *, palette: np.ndarray, ignore_index: int) -> Path:
    """All images in one grid: image+regions, patches, T (or U), prediction, ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["regions", "patches", "T" if items[0].transferability is not None else "U", "prediction", "ground truth"]
    fig, axes = plt.subplots(len(items), len(cols), figsize=(2.8 * len(cols), 2.3 * len(items)), squeeze=False)
    for r, p in enumerate(items):
        arrays = [
            _with_edges(p.image, p.regions),
            _with_edges(p.image, p.patches),
            p.transferability if p.transferability is not None else p.uncertainty,
            colorize(p.pred, palette),
            colorize(p.label, palette, ignore_index=ignore_index) if p.label is not None else p.image,
        ]
        for c, arr in enumerate(arrays):
            ax = axes[r, c]
            ax.imshow(
                arr,
                cmap="viridis" if arr.ndim == 2 else None,
                vmin=0 if arr.ndim == 2 else None,
                vmax=1 if arr.ndim == 2 else None,
            )
            ax.set_axis_off()
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
