"""Diagnostics of TMT inside the ViT (adapt.tma.where=vit|both, issue 26): per image, does 1 - T (ACTE on the tokens
entering the biased blocks) rank the source model's per-region error on the target, and do U and W; and does the bias
move the biased blocks' self-attention toward low-T keys (the share of attention mass on keys below the image's median
T, with the bias as trained and with it removed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from tmtseg.adapt.align import RegionAlignment
from tmtseg.adapt.attention import ViTTMAAttention
from tmtseg.adapt.method import Hooks
from tmtseg.config import Config
from tmtseg.tools.diagnose.measure import _wrong, to_label
from tmtseg.tools.diagnose.models import Model, piece


class _AttnTap:
    """Forward pre-hooks on the biased blocks' attention that keep each block's input and bias; `shares(low)` then gives
    the share of each block's attention mass (mean over heads and patch queries) on the keys of `low` (a bool [N] over
    the patch keys), recomputed from them: the keys are known only once the forward has computed T."""

    def __init__(self, blocks, num_prefix: int):
        self.prefix, self.calls = num_prefix, []
        self.handles = [b.attn.register_forward_pre_hook(self._tap) for b in blocks]

    def _tap(self, attn, args) -> None:
        self.calls.append((attn, args[0], args[1] if len(args) > 1 else None))

    def shares(self, low: Tensor) -> list[float]:
        """The shares of the calls kept since the last `shares`, in block order."""
        out = []
        for attn, x, bias in self.calls:
            B, N, C = x.shape
            qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            logits = qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(C // attn.num_heads)  # [B, h, N, N]
            if bias is not None:
                logits = logits + bias
            p = logits.float().softmax(-1)[:, :, self.prefix :, self.prefix :]  # patch queries -> patch keys
            m = low.to(p.device)
            out.append(float((p[..., m].sum(-1) / p.sum(-1).clamp_min(1e-12)).mean()))
        self.calls = []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rho(signal: np.ndarray, error: np.ndarray) -> float:
    if len(signal) < 3 or np.ptp(signal) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(signal, error).statistic)


@torch.no_grad()
def _image(models: dict[str, Model], image: Tensor, label: np.ndarray, ignore_index: int, min_pixels: float) -> dict:
    tmt = models["tmt"].trainer
    tma = piece(models["tmt"], ViTTMAAttention)
    acte = piece(models["tmt"], RegionAlignment)
    images = image[None]
    src = models["source"].trainer
    wrong = _wrong(src.model(images, hooks=src.method.inference_hooks()), images, label)
    prior = tmt.model.prior(images)
    hooks = Hooks(align=[acte], attention=[tma], grl=None, prior=prior)
    vit = tmt.model.backbone.vit
    start = hooks.backbone_at[1]
    tap = _AttnTap(vit.blocks[start:], vit.num_prefix)
    try:
        out = tmt.model(images, hooks=hooks)  # the bias as trained
        a = out["adapt"][RegionAlignment.key]
        hw = out["features"]["tokens_hw"]
        t_map = a["tmap"][0, 0].flatten()  # [N]
        low = t_map < torch.quantile(t_map, 0.5)
        on = tap.shares(low)
        tmt.model(images, hooks=Hooks(align=[acte], attention=[], grl=None, prior=prior))  # the same blocks, no bias
        off = tap.shares(low)
    finally:
        tap.close()
    H, W = image.shape[-2:]
    padded = (hw[0] * 16, hw[1] * 16)
    ids_tok = a["regions"].region_ids()[0]  # [h, w]
    ids = to_label(ids_tok, padded, (H, W), label.shape)  # [Hl, Wl]
    valid = label != ignore_index
    n = a["transferability"].shape[1]
    count = np.bincount(ids[valid], minlength=n)
    err = np.bincount(ids[valid & wrong], minlength=n) / np.maximum(count, 1)
    keep = count >= min_pixels
    u = tma.uncertainty(prior, hw)[0, 0].flatten().numpy()  # [N] on the token grid
    w = tma.importance(a["tmap"], prior, hw)[0, 0].flatten().numpy()
    flat = ids_tok.flatten().numpy()
    tok_count = np.maximum(np.bincount(flat, minlength=n), 1)
    signals = {
        "1-T": 1.0 - a["transferability"][0].numpy(),
        "U": np.bincount(flat, weights=u, minlength=n) / tok_count,
        "W": np.bincount(flat, weights=w, minlength=n) / tok_count,
    }
    return {
        "rho": {k: _rho(v[keep], err[keep]) for k, v in signals.items()},
        "regions": int(keep.sum()),
        "t_mean": float(a["transferability"][0].mean()),
        "share_on": on,
        "share_off": off,
    }


def diagnose_vit(models: dict[str, Model], cfg: Config, *, limit: int = 0, min_valid: float = 0.25, progress=None):
    """The ViT reading's measures on cfg.data.val (the first `limit` images; 0 = all): Spearman rho per image, averaged
    (with how many images have a defined rho), and the biased blocks' attention share on low-T keys, bias on / off."""
    from tmtseg.data import build_dataset

    ds = build_dataset(cfg.data.val, cfg.data, train=False, key="data.val")
    indices = range(len(ds) if not limit else min(limit, len(ds)))
    cell = cfg.adapt.acte.cell
    recs = []
    for i in progress(indices, desc="diagnose (ViT)") if progress else indices:
        item = ds[i]
        label = item["label"].numpy()
        min_pixels = min_valid * (cell * 16 * label.shape[0] / item["image"].shape[-2]) ** 2
        recs.append(_image(models, item["image"], label, cfg.data.ignore_index, min_pixels))
    rho = {}
    for k in ("1-T", "U", "W"):
        vals = np.array([r["rho"][k] for r in recs])
        ok = ~np.isnan(vals)
        rho[k] = {"mean": float(vals[ok].mean()) if ok.any() else None, "images": int(ok.sum())}
    tma = piece(models["tmt"], ViTTMAAttention)
    return {
        "reading": "vit",
        "images": len(recs),
        "spearman_per_image_vs_source_error": rho,
        "regions_per_image": float(np.mean([r["regions"] for r in recs])),
        "t_mean": float(np.mean([r["t_mean"] for r in recs])),
        "attention_share_on_low_t": {
            "bias_on": np.mean([r["share_on"] for r in recs], 0).round(4).tolist(),
            "bias_off": np.mean([r["share_off"] for r in recs], 0).round(4).tolist(),
            "chance": 0.5,
        },
        "lambdas": tma.lambdas.tolist(),
    }


def format_vit(result: dict) -> str:
    rho = result["spearman_per_image_vs_source_error"]
    att = result["attention_share_on_low_t"]
    lines = [
        f"TMT in the ViT, {result['images']} images, {result['regions_per_image']:.0f} regions per image,"
        f" mean T {result['t_mean']:.3f}",
        "Spearman rho per image vs the source model's region error (mean, images with a defined rho): "
        + ", ".join(
            f"{k} {v['mean']:+.3f} ({v['images']})" if v["mean"] is not None else f"{k} n/a" for k, v in rho.items()
        ),
        "attention share on low-T keys per biased block, bias on: "
        + " ".join(f"{s:.3f}" for s in att["bias_on"])
        + " | off: "
        + " ".join(f"{s:.3f}" for s in att["bias_off"]),
        "lambdas: " + " ".join(f"{x:+.3f}" for x in result["lambdas"]),
    ]
    return "\n".join(lines)
