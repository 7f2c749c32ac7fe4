"""The split's numbers from the per-view records: what is kept over the views, then the rank correlation of 1 - t
with the source error, the attention share per decoder layer, and the boundary recall and precision."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass
class Totals:
    """What `diagnose` keeps over the views: each image's region records (its views concatenated), each view's
    attention rows by model, and the boundary, fragment and assignment counts summed over views."""

    region_keys: list[str]
    per_image: dict[str, list[dict]] = field(init=False)
    attention: dict[str, list[list[dict]]] = field(default_factory=dict)
    boundary: dict[str, np.ndarray] = field(default_factory=dict)
    fragments: dict[str, np.ndarray] = field(default_factory=dict)
    assignment: np.ndarray | int = 0
    views: int = 0
    tolerances: tuple[float, ...] | None = None

    def __post_init__(self):
        self.per_image = {k: [] for k in self.region_keys}

    def add_image(self, recs: list[dict]) -> None:
        """The records of one image's views (measure_view's)."""
        for rec in recs:
            for name, layers in rec["attention"].items():
                self.attention.setdefault(name, []).append(layers)
            for k, counts in rec["boundary"].items():
                self.boundary[k] = self.boundary.get(k, 0) + counts
                self.fragments[k] = self.fragments.get(k, 0) + rec["fragments"][k]
            self.assignment = self.assignment + rec["assignment"]
            self.tolerances = rec["tolerances"]
        self.views += len(recs)
        for k in self.region_keys:
            self.per_image[k].append({f: np.concatenate([r[k][f] for r in recs]) for f in recs[0][k]})


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


def summarise_transfer(per_image: dict[str, list[dict]]) -> dict:
    """Per region map: _summarise_regions, with every model's errors for ACTE's regions, the source's for the rest."""
    wrong_models = tuple(m for m in ("source", "finetune", "tmt") if m in per_image["acte"][0])
    return {k: _summarise_regions(v, wrong_models if k == "acte" else ("source",)) for k, v in per_image.items()}


def _layer_means(runs: list[list[dict]], key: str) -> list:
    """The mean over views per layer (None where no view has the value, e.g. a map constant in every view)."""
    values = [[run[layer][key] for run in runs if key in run[layer]] for layer in range(len(runs[0]))]
    return [np.mean(v, axis=0) if v else None for v in values]


def summarise_attention(attention: dict[str, list[list[dict]]]) -> list[dict]:
    """Per decoder layer: the chance share, each model's share on low-T keys (mean and per head), and TMA's gaps."""
    layers = []
    chance = _layer_means(attention["tmt"], "chance")
    gaps, log_w_gaps = _layer_means(attention["tmt"], "gap"), _layer_means(attention["tmt"], "log_w_gap")
    for layer in range(len(chance)):
        row = {"layer": layer, "chance": float(chance[layer])}
        for name, runs in attention.items():
            per_head = _layer_means(runs, "share")[layer]
            row[name] = float(per_head.mean())
            row[f"{name}_per_head"] = per_head.tolist()
        if gaps[layer] is not None:
            row["tma_log_weight_gap_per_head"] = gaps[layer].tolist()
            row["log_w_gap"] = float(log_w_gaps[layer])  # the additive bias's gap at lambda = 1
        layers.append(row)
    return layers


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


def summarise_boundary(totals: Totals) -> dict:
    """Recall and precision of the region boundaries per tolerance, with what else moves them."""
    tolerances, boundary = totals.tolerances, totals.boundary
    bound = {"tolerances_px": [float(r) for r in tolerances]}
    bound.update({k: [_recall(r, c) for r, c in zip(tolerances, counts)] for k, counts in boundary.items()})
    # more boundary raises recall by itself: how much of the valid area is boundary, and how split the regions are
    bound["boundary_density"] = {k: float(c[0, 2] / max(c[0, 4], 1)) for k, c in boundary.items()}
    bound["pieces_per_region"] = {k: float(c[0] / max(c[1], 1)) for k, c in totals.fragments.items()}
    # mean over pixels of max_r a(p, r)
    bound["acte_mean_top_assignment"] = float(totals.assignment[0] / totals.assignment[1])
    return bound
