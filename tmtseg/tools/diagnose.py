"""Diagnostics of TMT's parts on a target evaluation split (issue 11 §4): does ACTE's transferability T point where the
source model fails (and TVT's patch transferability), does TMA move the decoder's attention toward low-T keys, and do
ACTE's regions follow the label's object boundaries better than the fixed grid they start from."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from tmtseg.adapt.acte import soft_cluster
from tmtseg.adapt.domain import binary_entropy_bits
from tmtseg.adapt.method import Hooks, ModelWithLoss, PatchAlignment, RegionAlignment, TMAAttention
from tmtseg.adapt.tma import resize_map
from tmtseg.config import Config
from tmtseg.errors import CheckpointError, ConfigError
from tmtseg.io.checkpoint import MODEL_FILE, list_checkpoints, load_checkpoint
from tmtseg.modeling.inference import _window_starts, input_scores
from tmtseg.tools.viz import boundaries, to_image


@dataclass
class Model:
    path: Path
    trainer: ModelWithLoss
    cfg: Config


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder or file as `eval` takes it, or a run folder (then its checkpoints/best)."""
    p = Path(path)
    if p.is_dir() and not (p / MODEL_FILE).exists() and (p / "checkpoints" / "best").exists():
        return p / "checkpoints" / "best"
    return p


def load_models(
    *, tmt: str, source: str | None = None, tvt: str | None = None, finetune: str | None = None, overrides=()
) -> tuple[dict[str, Model], Config]:
    """The models by role, and the config whose data.val is scored (the TMT checkpoint's, plus `overrides`).

    Raises CheckpointError for a checkpoint that lacks its role's piece (ACTE for --tmt, the patch discriminator for
    --tvt) or that belongs to another task or target split than the TMT checkpoint."""
    from tmtseg.engine.loop import model_with_loss_from_checkpoint

    def load(path: str, extra=()) -> Model:
        p = resolve_checkpoint(path)
        trainer, cfg, _ = model_with_loss_from_checkpoint(p, list(extra))
        return Model(path=p, trainer=trainer.eval(), cfg=cfg)

    models = {"tmt": load(tmt, overrides)}
    cfg = models["tmt"].cfg
    if _piece(models["tmt"], RegionAlignment) is None:
        raise CheckpointError(
            f"{models['tmt'].path}: a {cfg.adapt.method} checkpoint without ACTE; --tmt needs a tmt one"
        )
    if source is None:
        if not cfg.adapt.source_checkpoint:
            raise ConfigError(
                f"{models['tmt'].path}: names no adapt.source_checkpoint; give the source model (--source)"
            )
        source = cfg.adapt.source_checkpoint
    elif cfg.adapt.source_checkpoint and Path(source).resolve() != Path(cfg.adapt.source_checkpoint).resolve():
        warnings.warn(f"--source {source}: the TMT model was adapted from {cfg.adapt.source_checkpoint}", stacklevel=2)
    models["source"] = load(source)
    for role, path in (("tvt", tvt), ("finetune", finetune)):
        if path is not None:
            models[role] = load(path)
    if "tvt" in models and _piece(models["tvt"], PatchAlignment) is None:
        m = models["tvt"]
        raise CheckpointError(
            f"{m.path}: a {m.cfg.adapt.method} checkpoint without a patch discriminator; --tvt needs a tvt one"
        )
    for role, m in models.items():
        d, ref = m.cfg.data, cfg.data
        if (d.num_classes, d.ignore_index, d.scale) != (ref.num_classes, ref.ignore_index, ref.scale):
            raise CheckpointError(
                f"{m.path}: --{role} is of another task than --tmt (classes, ignore index, data.scale: "
                f"{d.num_classes}, {d.ignore_index}, {d.scale} vs {ref.num_classes}, {ref.ignore_index}, {ref.scale})"
            )
        if role in ("tvt", "finetune") and asdict(d.train) != asdict(ref.train):
            raise CheckpointError(f"{m.path}: --{role} was adapted on another target split (data.train) than --tmt")
    return models, cfg


def _piece(model: Model, kind: type):
    return next(
        (p for p in [*model.trainer.method.align, *model.trainer.method.attention] if isinstance(p, kind)), None
    )


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


def _attention(out: dict, tmap: torch.Tensor, padded, size, low_t, rec: _Recorder | None) -> list[dict]:
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
        if rec is not None and layer in rec.terms and low.any() and high.any():
            bias, scale = rec.terms[layer]
            logw = bias[0] if bias is not None else torch.log(scale[0].clamp_min(1e-12))  # [h, N]
            row["gap"] = (logw[:, low].mean(-1) - logw[:, high].mean(-1)).float().numpy()  # [h]
            log_w = rec.log_w[layer][0, 0]  # [N]
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


@torch.no_grad()
def measure_view(models: dict[str, Model], image, label, *, ignore_index, min_valid, low_t, tolerance) -> dict:
    """Every per-view record: image uint8 [3, h, w], label int64 [Hl, Wl] of the same view."""
    images = image[None]  # [1, 3, h, w]
    size, label_hw = tuple(image.shape[-2:]), tuple(label.shape)
    lab = label.numpy()
    valid = lab != ignore_index
    ry, rx = label_hw[0] / size[0], label_hw[1] / size[1]
    tmt = models["tmt"]
    acte = _piece(tmt, RegionAlignment)
    tma = _piece(tmt, TMAAttention)
    on = _Recorder(Hooks(align=[acte], attention=[tma] if tma else [], grl=None), tma)
    out_on = tmt.trainer.model(images, hooks=on, return_attn=True)
    out_off = tmt.trainer.model(images, hooks=Hooks(align=[acte], attention=[], grl=None), return_attn=True)
    padded = tuple(32 * n for n in out_on["features"]["multi_scale"][0].shape[-2:])  # the stride-32 grid covers it
    src = models["source"].trainer
    wrongs = {"source": _wrong(src.model(images, hooks=src.method.inference_hooks()), images, lab)}
    wrongs["tmt"] = _wrong(out_on, images, lab)
    outs = {"tmt": out_on, "tmt_without_tma": out_off}
    if "finetune" in models:
        ft = models["finetune"].trainer
        outs["finetune"] = ft.model(images, hooks=ft.method.inference_hooks(), return_attn=True)
        wrongs["finetune"] = _wrong(outs["finetune"], images, lab)

    a = out_on["adapt"][RegionAlignment.key]
    cell_px = acte.cell * acte.feature_stride  # a region's nominal side in input pixels
    nominal = cell_px * ry * cell_px * rx  # ... its area at label resolution
    region_ids = to_label(a["regions"].region_ids()[0], padded, size, label_hw)
    rec = {"acte": _regions(region_ids, valid, wrongs, a["transferability"][0].numpy(), min_valid * nominal, low_t)}
    if tma is not None:  # TMA's own signals per ACTE region, on the final prediction: U, and W from 1 - T and U
        final = {"pred_logits": out_on["pred_logits"], "pred_masks": out_on["pred_masks"]}
        hw4 = tuple(final["pred_masks"].shape[-2:])
        maps = {"uncertainty": tma.uncertainty(final, hw4)}
        maps["importance"] = tma.importance(acte.image_map(out_on["adapt"], hw4), final, hw4)  # [1, 1, h/4, w/4]
        count = np.bincount(region_ids[valid], minlength=a["transferability"].shape[1])
        for name, m in maps.items():
            m = F.interpolate(m.float(), scale_factor=4.0, mode="bilinear", align_corners=False)[
                ..., : size[0], : size[1]
            ]
            dense = F.interpolate(m, size=label_hw, mode="bilinear", align_corners=False)[0, 0].numpy()  # [Hl, Wl]
            mean = np.bincount(region_ids[valid], weights=dense[valid], minlength=len(count)) / np.maximum(count, 1)
            # as a "t": 1 - U and 1 - W, so that 1 - t is the signal, as for T
            rec[name] = _regions(
                region_ids, valid, {"source": wrongs["source"]}, 1.0 - mean, min_valid * nominal, low_t
            )
    fixed = soft_cluster(acte.feature_map(out_on["features"]), cell=acte.cell, iters=0, kappa=acte.kappa)
    t_fixed = binary_entropy_bits(torch.sigmoid(acte.discriminator(fixed.features)))[0].numpy()
    grid_ids = to_label(fixed.region_ids()[0], padded, size, label_hw)
    rec["acte_grid"] = _regions(grid_ids, valid, {"source": wrongs["source"]}, t_fixed, min_valid * nominal, low_t)
    if "tvt" in models:
        tv = models["tvt"].trainer
        out_v = tv.model(images, hooks=tv.method.inference_hooks())
        t_patch = binary_entropy_bits(torch.sigmoid(out_v["adapt"][PatchAlignment.key][0])).numpy()  # [N]
        hw = out_v["features"]["tokens_hw"]
        patch_ids = to_label(torch.arange(hw[0] * hw[1]).reshape(hw), padded, size, label_hw)
        patch = padded[0] / hw[0] * ry * padded[1] / hw[1] * rx
        rec["tvt"] = _regions(patch_ids, valid, {"source": wrongs["source"]}, t_patch, min_valid * patch, low_t)

    tmap = a["tmap"]  # [1, 1, h', w'] on the padded grid, as TMA reads it
    rec["attention"] = {
        name: _attention(o, tmap, padded, size, low_t, on if name == "tmt" else None) for name, o in outs.items()
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


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _summarise_regions(per_image: list[dict], models: tuple[str, ...]) -> dict:
    """Spearman of 1 - t against the source error rate over every region of the split, and per image (mean)."""
    cat = {k: np.concatenate([r[k] for r in per_image]) for k in ("t", "valid", "low", *models)}
    rho, p = _spearman(1.0 - cat["t"], cat["source"] / cat["valid"])
    per = [_spearman(1.0 - r["t"], r["source"] / r["valid"])[0] for r in per_image if len(r["t"])]
    per = [x for x in per if x is not None]
    errors = {
        m: {
            "low_t": float(cat[m][cat["low"]].sum() / max(cat["valid"][cat["low"]].sum(), 1)),
            "high_t": float(cat[m][~cat["low"]].sum() / max(cat["valid"][~cat["low"]].sum(), 1)),
        }
        for m in models
    }
    return {
        "regions": int(len(cat["t"])),
        "spearman": rho,
        "p_value": p,
        "per_image_spearman_mean": float(np.mean(per)) if per else None,
        "images_with_spearman": len(per),
        "mean_t": float(cat["t"].mean()) if len(cat["t"]) else None,
        "std_t": float(cat["t"].std()) if len(cat["t"]) else None,  # a map that barely varies cannot steer attention
        "error_rate_by_t": errors,
    }


def _recall(r: float, c: np.ndarray) -> dict:
    edges, recalled, region, precise, valid, near = (int(x) for x in c)
    return {
        "tolerance_px": float(r),
        "recall": recalled / max(edges, 1),
        "precision": precise / max(region, 1),
        "chance_precision": near / max(valid, 1),  # of boundary pixels placed at random
        "label_edge_px": edges,
        "region_boundary_px": region,
    }


def lambda_history(path: Path) -> list[dict]:
    """TMA's lambda per head at each checkpoint its run folder still holds (iter_* and best), by step."""
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    ckpts = [folder]
    if folder.parent.name == "checkpoints":
        ckpts = [*list_checkpoints(folder.parent.parent), *folder.parent.glob("best_iter_*")]
    steps = {}
    for ckpt in ckpts:
        c = load_checkpoint(ckpt)
        if "method.tma.lambdas" in c.weights:
            steps[int(c.meta.get("step", -1))] = c.weights["method.tma.lambdas"].tolist()
    return [{"step": s, "lambdas": steps[s]} for s in sorted(steps)]


def diagnose(
    models: dict[str, Model],
    cfg: Config,
    *,
    limit: int = 0,
    min_valid: float = 0.25,
    low_t: str | float = "median",
    tolerance: float = 2.0,
    progress=None,
) -> dict:
    """Every measure on cfg.data.val (the first `limit` images; 0 = all) -> a JSON-ready dict (see the README)."""
    from tmtseg.data import build_dataset

    ds = build_dataset(cfg.data.val, cfg.data, train=False, key="data.val")
    indices = range(len(ds) if not limit else min(limit, len(ds)))
    region_keys = ["acte", "acte_grid", *(["tvt"] if "tvt" in models else [])]
    region_keys += ["uncertainty", "importance"] if _piece(models["tmt"], TMAAttention) else []
    per_image = {k: [] for k in region_keys}
    attention, boundary, fragments, assignment, n_views, tolerances = {}, {}, {}, 0, 0, None
    for i in progress(indices, desc="diagnose") if progress else indices:
        item = ds[i]
        image, label = item["image"], item["label"]
        recs = []
        for ys, xs, ly, lx in views(tuple(image.shape[-2:]), tuple(label.shape), cfg):
            rec = measure_view(
                models, image[:, ys, xs], label[ly, lx], ignore_index=cfg.data.ignore_index, min_valid=min_valid,
                low_t=low_t, tolerance=tolerance,
            )  # fmt: skip
            recs.append(rec)
            for name, layers in rec["attention"].items():
                attention.setdefault(name, []).append(layers)
            for k, counts in rec["boundary"].items():
                boundary[k] = boundary.get(k, 0) + counts
                fragments[k] = fragments.get(k, 0) + rec["fragments"][k]
            assignment = assignment + rec["assignment"]
            tolerances = rec["tolerances"]
        n_views += len(recs)
        for k in region_keys:
            per_image[k].append({f: np.concatenate([r[k][f] for r in recs]) for f in recs[0][k]})
    wrong_models = tuple(m for m in ("source", "finetune", "tmt") if m in per_image["acte"][0])
    transfer = {k: _summarise_regions(v, wrong_models if k == "acte" else ("source",)) for k, v in per_image.items()}

    def layer_means(runs: list[list[dict]], key: str) -> list:
        """The mean over views per layer (None where no view has the value, e.g. a map constant in every view)."""
        values = [[run[layer][key] for run in runs if key in run[layer]] for layer in range(len(runs[0]))]
        return [np.mean(v, axis=0) if v else None for v in values]

    layers = []
    chance = layer_means(attention["tmt"], "chance")
    gaps, log_w_gaps = layer_means(attention["tmt"], "gap"), layer_means(attention["tmt"], "log_w_gap")
    for layer in range(len(chance)):
        row = {"layer": layer, "chance": float(chance[layer])}
        for name, runs in attention.items():
            per_head = layer_means(runs, "share")[layer]
            row[name] = float(per_head.mean())
            row[f"{name}_per_head"] = per_head.tolist()
        if gaps[layer] is not None:
            row["tma_log_weight_gap_per_head"] = gaps[layer].tolist()
            row["log_w_gap"] = float(log_w_gaps[layer])  # the additive bias's gap at lambda = 1
        layers.append(row)
    bound = {"tolerances_px": [float(r) for r in tolerances]}
    bound.update({k: [_recall(r, c) for r, c in zip(tolerances, counts)] for k, counts in boundary.items()})
    # more boundary raises recall by itself: how much of the valid area is boundary, and how split the regions are
    bound["boundary_density"] = {k: float(c[0, 2] / max(c[0, 4], 1)) for k, c in boundary.items()}
    bound["pieces_per_region"] = {k: float(c[0] / max(c[1], 1)) for k, c in fragments.items()}
    bound["acte_mean_top_assignment"] = float(assignment[0] / assignment[1])  # mean over pixels of max_r a(p, r)
    view = "whole image" if cfg.infer.mode == "whole" else "tiles of {}x{}".format(*cfg.data.crop_size)
    tma = _piece(models["tmt"], TMAAttention)
    return {
        "checkpoints": {role: str(m.path) for role, m in models.items()},
        "split": asdict(cfg.data.val),
        "images": len(indices),
        "views": n_views,
        "view": view,
        "settings": {"min_valid": min_valid, "low_t": low_t, "tolerance_px": tolerance},
        "transferability_vs_source_error": transfer,
        "attention": {
            "low_t": "T below the view's median T" if low_t == "median" else f"T < {low_t}",
            "layers": layers,
            "lambdas": tma.lambdas.tolist() if tma is not None else None,
            "lambda_history": lambda_history(models["tmt"].path),
        },
        "boundary_recall": bound,
    }


def format_report(r: dict) -> str:
    """The JSON's numbers as plain-text tables."""
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"data.val of {r['checkpoints']['tmt']}: {r['images']} images, {r['views']} views ({r['view']})", ""]
    lines.append("1. transferability vs the source model's error (Spearman of 1 - t and the error rate, per region)")
    lines.append(f"  {'map':<26}{'regions':>8}{'rho':>8}{'p':>10}{'rho/image':>11}{'mean t':>8}{'std t':>8}")
    names = {
        "acte": "ACTE regions: T",
        "acte_grid": "ACTE disc., fixed grid",
        "tvt": "TVT patches",
        "uncertainty": "ACTE regions: 1 - U",
        "importance": "ACTE regions: 1 - W",
    }
    for k, s in r["transferability_vs_source_error"].items():
        p = "-" if s["p_value"] is None else f"{s['p_value']:.1e}"
        lines.append(
            f"  {names[k]:<26}{s['regions']:>8}{f(s['spearman']):>8}{p:>10}{f(s['per_image_spearman_mean']):>11}"
            f"{f(s['mean_t']):>8}{f(s['std_t']):>8}"
        )
    low = r["settings"]["low_t"]
    split = "the view's median" if low == "median" else f"{low}"
    lines.append(f"  error rate in ACTE regions of low / high t (t below / at or above {split}):")
    for m, e in r["transferability_vs_source_error"]["acte"]["error_rate_by_t"].items():
        lines.append(f"    {m:<10} {f(e['low_t'])} / {f(e['high_t'])}")
    att = r["attention"]
    lines += ["", f"2. decoder cross-attention mass on low-T keys ({att['low_t']}); chance = share of such keys"]
    names = [k for k in ("tmt", "tmt_without_tma", "finetune") if k in att["layers"][0]]
    lines.append(
        f"  {'layer':<7}{'chance':>8}" + "".join(f"{n:>17}" for n in names) + f"{'TMA gap (nats)':>16}"
        + f"{'at lambda=1':>13}"
    )  # fmt: skip
    for row in att["layers"]:
        gap = row.get("tma_log_weight_gap_per_head")
        lines.append(
            f"  {row['layer']:<7}{f(row['chance']):>8}" + "".join(f"{f(row[n]):>17}" for n in names)
            + f"{f(float(np.mean(gap)) if gap else None):>16}{f(row.get('log_w_gap')):>13}"
        )  # fmt: skip
    lam = att["lambdas"]
    lines.append(
        f"  lambda per head (shared by the layers): {'-' if lam is None else ' '.join(f'{x:+.4f}' for x in lam)}"
    )
    for h in att["lambda_history"]:
        lines.append(f"    step {h['step']}: {' '.join(f'{x:+.4f}' for x in h['lambdas'])}")
    b = r["boundary_recall"]
    chance = " / ".join(f(x["chance_precision"]) for x in b["acte"])
    lines += [
        "",
        f"3. boundary recall of the regions against the label edges (precision in brackets; at random {chance})",
    ]
    lines.append(
        f"  {'regions':<9}" + "".join(f"{f'r = {t:.1f} px':>20}" for t in b["tolerances_px"])
        + f"{'boundary density':>18}{'pieces/region':>15}"
    )  # fmt: skip
    for k in ("acte", "grid"):
        lines.append(
            f"  {k:<9}" + "".join(f"{f(x['recall']):>11} ({f(x['precision'])})" for x in b[k])
            + f"{f(b['boundary_density'][k]):>18}{f(b['pieces_per_region'][k], 2):>15}"
        )  # fmt: skip
    lines.append(f"  ACTE's soft assignment: mean max_r a(p, r) = {f(b['acte_mean_top_assignment'])} (1/9 = uniform)")
    return "\n".join(lines)
