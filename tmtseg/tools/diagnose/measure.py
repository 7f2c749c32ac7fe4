"""One view of an image through every model, measured: the regions' transferability next to where each model is
wrong, the decoder's cross-attention on low-T keys, and how the regions' boundaries follow the label's edges."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from tmtseg.adapt.acte import soft_cluster
from tmtseg.adapt.align import PatchAlignment, RegionAlignment
from tmtseg.adapt.attention import TMAAttention
from tmtseg.adapt.domain import binary_entropy_bits
from tmtseg.adapt.method import Hooks
from tmtseg.adapt.tma import resize_map
from tmtseg.config import Config
from tmtseg.modeling.inference import _window_starts, input_scores
from tmtseg.tools.diagnose.models import Model, piece
from tmtseg.tools.viz import boundaries, to_image


def views(image_hw: tuple[int, int], label_hw: tuple[int, int], cfg: Config) -> list[tuple[slice, slice, slice, slice]]:
    """What one forward pass sees, as the model is evaluated: the whole image (infer.mode=whole), or tiles of the
    training crop covering it with as little overlap as fits (slide): (image rows, cols, label rows, cols) slices."""
    (h, w), (hl, wl) = image_hw, label_hw
    if cfg.infer.mode == "whole":
        return [(slice(0, h), slice(0, w), slice(0, hl), slice(0, wl))]
    ch, cw = min(cfg.data.crop_size[0], h), min(cfg.data.crop_size[1], w)
    out = []
    for y in _window_starts(h, ch, ch):
        for x in _window_starts(w, cw, cw):
            ly, lx = (
                slice(round(y * hl / h), round((y + ch) * hl / h)),
                slice(round(x * wl / w), round((x + cw) * wl / w)),
            )
            out.append((slice(y, y + ch), slice(x, x + cw), ly, lx))
    return out


def to_label(
    grid: torch.Tensor, padded: tuple[int, int], size: tuple[int, int], label_hw: tuple[int, int]
) -> np.ndarray:
    """Ids [h', w'] on the padded input grid -> int64 [Hl, Wl] at label resolution (each label pixel takes the cell
    its centre falls in)."""
    ids = to_image(grid.float(), padded, size, mode="nearest")  # [h, w]
    rows = np.minimum(((np.arange(label_hw[0]) + 0.5) * size[0] / label_hw[0]).astype(np.int64), size[0] - 1)
    cols = np.minimum(((np.arange(label_hw[1]) + 0.5) * size[1] / label_hw[1]).astype(np.int64), size[1] - 1)
    return ids[np.ix_(rows, cols)].round().astype(np.int64)


class _Recorder:
    """Hooks that keep, per decoder layer, what the decoder hook returned (TMA's bias or scale) and log(eps + W), the
    bias TMA adds at lambda = 1 (its importance map W does not depend on lambda)."""

    def __init__(self, hooks: Hooks, tma: TMAAttention | None):
        self.inner, self.tma, self.terms, self.log_w = hooks, tma, {}, {}
        self.backbone_attn, self.pixel_features = hooks.backbone_attn, hooks.pixel_features

    def decoder_attn(self, layer: int, prev: dict, hw: tuple[int, int], adapt: dict):
        bias, scale = self.inner.decoder_attn(layer, prev, hw, adapt)
        self.terms[layer] = (bias, scale)
        if self.tma is not None:
            w = self.tma.importance(resize_map(adapt[RegionAlignment.key]["tmap"], hw), prev, hw)  # [B, 1, h, w]
            self.log_w[layer] = torch.log(self.tma.eps + w).flatten(2)  # [B, 1, h*w]
        return bias, scale


def _wrong(out: dict, images: torch.Tensor, label: np.ndarray) -> np.ndarray:
    """Where the prediction of a segmenter output differs from the label (at label resolution, as `eval` scores)."""
    scores = F.interpolate(input_scores(out, images), size=label.shape, mode="bilinear", align_corners=False)
    return scores[0].argmax(0).numpy() != label


def _low(t: np.ndarray, low_t: str | float) -> np.ndarray:
    """Low transferability: below the view's median (over the values given) or below a fixed threshold."""
    thr = np.median(t) if low_t == "median" else float(low_t)
    return t < thr


def _regions(ids, valid, wrongs: dict, t, min_pixels, low_t) -> dict:
    """Per-region valid-pixel counts, wrong-pixel counts per model and t, for the regions with enough valid pixels."""
    n = t.shape[0]
    count = np.bincount(ids[valid], minlength=n)
    keep = count >= min_pixels
    rec = {"t": t[keep], "valid": count[keep], "low": _low(t[keep], low_t) if keep.any() else np.zeros(0, bool)}
    for name, wrong in wrongs.items():
        rec[name] = np.bincount(ids[valid & wrong], minlength=n)[keep]
    return rec


def _key_mask(hw, padded, size) -> torch.Tensor:
    """bool [h*w]: the memory keys whose cell starts inside the image (not in the bottom/right padding)."""
    sy, sx = padded[0] // hw[0], padded[1] // hw[1]
    rows, cols = torch.arange(hw[0]) * sy < size[0], torch.arange(hw[1]) * sx < size[1]
    return (rows[:, None] & cols[None, :]).flatten()


def _attention(out: dict, tmap: torch.Tensor, padded, size, low_t, recorder: _Recorder | None) -> list[dict]:
    """Per decoder layer: the share of each head's cross-attention mass on low-T keys among the keys inside the image
    (mean over queries), the share of such keys (chance), and (with the TMA recorder) TMA's log-weight gap between
    low- and high-T keys per head, and the gap of log(eps + W) (lambda = 1)."""
    layers = []
    for layer, (probs, hw) in enumerate(zip(out["attn"], out["attn_hw"])):
        t = resize_map(tmap, hw)[0, 0].flatten()  # [h*w], as TMA sees T at this layer
        valid = _key_mask(hw, padded, size)
        thr = torch.quantile(t[valid], 0.5) if low_t == "median" else float(low_t)
        low, high = valid & (t < thr), valid & ~(t < thr)
        p = probs[0].float()  # [h, Q, N]
        mass, mass_low = p[..., valid].sum(-1), p[..., low].sum(-1)  # [h, Q]
        seen = mass > 0  # a query whose mask covers only padding has no share here
        share = torch.where(seen, mass_low / mass.clamp_min(1e-12), 0).sum(-1) / seen.sum(-1).clamp_min(1)  # [h]
        row = {"share": share.numpy(), "chance": float(low.sum() / valid.sum())}
        if recorder is not None and layer in recorder.terms and low.any() and high.any():
            bias, scale = recorder.terms[layer]
            logw = bias[0] if bias is not None else torch.log(scale[0].clamp_min(1e-12))  # [h, N]
            row["gap"] = (logw[:, low].mean(-1) - logw[:, high].mean(-1)).float().numpy()  # [h]
            log_w = recorder.log_w[layer][0, 0]  # [N]
            row["log_w_gap"] = float(log_w[low].mean() - log_w[high].mean())
        layers.append(row)
    return layers


def _boundary(ids: np.ndarray, edges: np.ndarray, valid: np.ndarray, tolerances: tuple[float, ...]) -> np.ndarray:
    """Counts [len(tolerances), 6]: label-edge pixels, those within r of a region boundary, region-boundary pixels on
    valid labels, those within r of a label edge, valid pixels (for the boundary density), valid pixels within r of a
    label edge (the precision of boundaries drawn at random)."""
    region = boundaries(ids)
    inf = np.full(ids.shape, np.inf)
    d_region = ndimage.distance_transform_edt(~region) if region.any() else inf
    d_edge = ndimage.distance_transform_edt(~edges) if edges.any() else inf
    inside = region & valid
    return np.array(
        [
            [
                edges.sum(),
                (edges & (d_region <= r)).sum(),
                inside.sum(),
                (inside & (d_edge <= r)).sum(),
                valid.sum(),
                (valid & (d_edge <= r)).sum(),
            ]
            for r in tolerances
        ]
    )


def _fragments(ids: np.ndarray) -> np.ndarray:
    """[connected pieces, regions] of a region map on its feature grid (a hard argmax can split a soft region)."""
    present = np.unique(ids)
    return np.array([sum(ndimage.label(ids == r)[1] for r in present), len(present)])


def _forward(models: dict[str, Model], images, lab, acte, recorder: _Recorder) -> tuple[dict, dict]:
    """The outputs whose attention is measured (TMT with and without TMA, the fine-tuned model), and per model where
    its prediction is wrong."""
    tmt = models["tmt"].trainer.model
    out_on = tmt(images, hooks=recorder, return_attn=True)
    out_off = tmt(images, hooks=Hooks(align=[acte], attention=[], grl=None), return_attn=True)
    src = models["source"].trainer
    wrongs = {"source": _wrong(src.model(images, hooks=src.method.inference_hooks()), images, lab)}
    wrongs["tmt"] = _wrong(out_on, images, lab)
    outs = {"tmt": out_on, "tmt_without_tma": out_off}
    if "finetune" in models:
        ft = models["finetune"].trainer
        outs["finetune"] = ft.model(images, hooks=ft.method.inference_hooks(), return_attn=True)
        wrongs["finetune"] = _wrong(outs["finetune"], images, lab)
    return outs, wrongs


def _tma_signals(tma, acte, out, region_ids, valid, size, label_hw, n_regions: int) -> dict[str, np.ndarray]:
    """TMA's own signals per ACTE region, on the final prediction: U, and W from 1 - T and U, each as a "t" (1 - U and
    1 - W), so that 1 - t is the signal, as for T."""
    final = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
    hw4 = tuple(final["pred_masks"].shape[-2:])
    maps = {"uncertainty": tma.uncertainty(final, hw4)}
    maps["importance"] = tma.importance(acte.image_map(out["adapt"], hw4), final, hw4)  # [1, 1, h/4, w/4]
    count = np.bincount(region_ids[valid], minlength=n_regions)
    signals = {}
    for name, m in maps.items():
        m = F.interpolate(m.float(), scale_factor=4.0, mode="bilinear", align_corners=False)[..., : size[0], : size[1]]
        dense = F.interpolate(m, size=label_hw, mode="bilinear", align_corners=False)[0, 0].numpy()  # [Hl, Wl]
        mean = np.bincount(region_ids[valid], weights=dense[valid], minlength=len(count)) / np.maximum(count, 1)
        signals[name] = 1.0 - mean
    return signals


def _tvt_patches(model: Model, images, padded, size, label_hw) -> tuple[np.ndarray, np.ndarray, float]:
    """TVT's patch ids at label resolution, each patch's transferability, and a patch's area at label resolution."""
    tv = model.trainer
    out = tv.model(images, hooks=tv.method.inference_hooks())
    t_patch = binary_entropy_bits(torch.sigmoid(out["adapt"][PatchAlignment.key][0])).numpy()  # [N]
    hw = out["features"]["tokens_hw"]
    patch_ids = to_label(torch.arange(hw[0] * hw[1]).reshape(hw), padded, size, label_hw)
    ry, rx = label_hw[0] / size[0], label_hw[1] / size[1]
    return patch_ids, t_patch, padded[0] / hw[0] * ry * padded[1] / hw[1] * rx


@torch.no_grad()
def measure_view(models: dict[str, Model], image, label, *, ignore_index, min_valid, low_t, tolerance) -> dict:
    """Every per-view record: image uint8 [3, h, w], label int64 [Hl, Wl] of the same view."""
    images = image[None]  # [1, 3, h, w]
    size, label_hw = tuple(image.shape[-2:]), tuple(label.shape)
    lab = label.numpy()
    valid = lab != ignore_index
    ry, rx = label_hw[0] / size[0], label_hw[1] / size[1]
    acte, tma = piece(models["tmt"], RegionAlignment), piece(models["tmt"], TMAAttention)
    recorder = _Recorder(Hooks(align=[acte], attention=[tma] if tma else [], grl=None), tma)
    outs, wrongs = _forward(models, images, lab, acte, recorder)
    out = outs["tmt"]
    padded = tuple(32 * n for n in out["features"]["multi_scale"][0].shape[-2:])  # the stride-32 grid covers it
    source = {"source": wrongs["source"]}

    a = out["adapt"][RegionAlignment.key]
    cell_px = acte.cell * acte.feature_stride  # a region's nominal side in input pixels
    nominal = cell_px * ry * cell_px * rx  # ... its area at label resolution
    region_ids = to_label(a["regions"].region_ids()[0], padded, size, label_hw)
    rec = {"acte": _regions(region_ids, valid, wrongs, a["transferability"][0].numpy(), min_valid * nominal, low_t)}
    if tma is not None:
        signals = _tma_signals(tma, acte, out, region_ids, valid, size, label_hw, a["transferability"].shape[1])
        for name, t in signals.items():
            rec[name] = _regions(region_ids, valid, source, t, min_valid * nominal, low_t)
    fixed = soft_cluster(acte.feature_map(out["features"]), cell=acte.cell, iters=0, kappa=acte.kappa)
    t_fixed = binary_entropy_bits(torch.sigmoid(acte.discriminator(fixed.features)))[0].numpy()
    grid_ids = to_label(fixed.region_ids()[0], padded, size, label_hw)
    rec["acte_grid"] = _regions(grid_ids, valid, source, t_fixed, min_valid * nominal, low_t)
    if "tvt" in models:
        patch_ids, t_patch, patch = _tvt_patches(models["tvt"], images, padded, size, label_hw)
        rec["tvt"] = _regions(patch_ids, valid, source, t_patch, min_valid * patch, low_t)

    tmap = a["tmap"]  # [1, 1, h', w'] on the padded grid, as TMA reads it
    rec["attention"] = {
        name: _attention(o, tmap, padded, size, low_t, recorder if name == "tmt" else None) for name, o in outs.items()
    }
    edges = boundaries(lab, valid)
    tolerances = (tolerance, acte.feature_stride * ry)  # r px, and one feature pixel, at label resolution
    rec["boundary"] = {
        k: _boundary(ids, edges, valid, tolerances) for k, ids in (("acte", region_ids), ("grid", grid_ids))
    }
    rec["tolerances"] = tolerances
    rows, cols = -(-size[0] // acte.feature_stride), -(-size[1] // acte.feature_stride)  # the grid cells on the image
    top = a["regions"].assign[0, :, :rows, :cols].max(0).values  # [h', w']: 1/9 = a uniform mix, 1 = a hard region
    rec["assignment"] = np.array([float(top.sum()), top.numel()])
    rec["fragments"] = {
        "acte": _fragments(a["regions"].region_ids()[0, :rows, :cols].numpy()),
        "grid": _fragments(fixed.region_ids()[0, :rows, :cols].numpy()),
    }
    return rec
