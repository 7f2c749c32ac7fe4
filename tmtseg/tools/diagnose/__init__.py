"""Diagnostics of TMT's parts on a target evaluation split (issue 11 §4): does ACTE's transferability T point where the
source model fails (and TVT's patch transferability), does TMA move the decoder's attention toward low-T keys, and do
ACTE's regions follow the label's object boundaries better than the fixed grid they start from.

models: the checkpoints by role; measure: one view through them; summary: the split's numbers; report: as text."""

from __future__ import annotations

from dataclasses import asdict

from tmtseg.adapt.attention import TMAAttention
from tmtseg.config import Config
from tmtseg.tools.diagnose.measure import _boundary, _fragments, _regions, measure_view, to_label, views
from tmtseg.tools.diagnose.models import Model, lambda_history, load_models, piece, resolve_checkpoint
from tmtseg.tools.diagnose.report import format_report
from tmtseg.tools.diagnose.summary import (
    Totals,
    _summarise_regions,
    summarise_attention,
    summarise_boundary,
    summarise_transfer,
)

# what the CLI and the tests import from tmtseg.tools.diagnose
__all__ = [
    "Model",
    "_boundary",
    "_fragments",
    "_regions",
    "_summarise_regions",
    "diagnose",
    "format_report",
    "lambda_history",
    "load_models",
    "measure_view",
    "resolve_checkpoint",
    "to_label",
    "views",
]


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
    # deferred, as it always was: the data package is needed only once a split is scored
    from tmtseg.data import build_dataset

    ds = build_dataset(cfg.data.val, cfg.data, train=False, key="data.val")
    indices = range(len(ds) if not limit else min(limit, len(ds)))
    tma = piece(models["tmt"], TMAAttention)
    region_keys = ["acte", "acte_grid", *(["tvt"] if "tvt" in models else [])]
    totals = Totals(region_keys + (["uncertainty", "importance"] if tma else []))
    for i in progress(indices, desc="diagnose") if progress else indices:
        item = ds[i]
        image, label = item["image"], item["label"]
        recs = [
            measure_view(
                models,
                image[:, ys, xs],
                label[ly, lx],
                ignore_index=cfg.data.ignore_index,
                min_valid=min_valid,
                low_t=low_t,
                tolerance=tolerance,
            )
            for ys, xs, ly, lx in views(tuple(image.shape[-2:]), tuple(label.shape), cfg)
        ]
        totals.add_image(recs)
    view = "whole image" if cfg.infer.mode == "whole" else "tiles of {}x{}".format(*cfg.data.crop_size)
    return {
        "checkpoints": {role: str(m.path) for role, m in models.items()},
        "split": asdict(cfg.data.val),
        "images": len(indices),
        "views": totals.views,
        "view": view,
        "settings": {"min_valid": min_valid, "low_t": low_t, "tolerance_px": tolerance},
        "transferability_vs_source_error": summarise_transfer(totals.per_image),
        "attention": {
            "low_t": "T below the view's median T" if low_t == "median" else f"T < {low_t}",
            "layers": summarise_attention(totals.attention),
            "lambdas": tma.lambdas.tolist() if tma is not None else None,
            "lambda_history": lambda_history(models["tmt"].path),
        },
        "boundary_recall": summarise_boundary(totals),
    }
