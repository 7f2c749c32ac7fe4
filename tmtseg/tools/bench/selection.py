"""The advise bench's two steps before an adaptation (docs/advise.md, "The advise bench"), run in-process by the same
code as `tmtseg advise`:

- score: the source model scores every image of the pool once (tools/advise.py's score_pool): the per-image means
  and pooled features in scores.npz, every region's pixel count and mean U (1 - T, W where the model has them) in
  regions.npz, each image's region ids in ids/<i>.npz (a grid compresses to almost nothing);
- select: one choice from those scores (advise_select.py's choose / choose_regions, the random ones with their own
  seed per draw), written as `tmtseg advise` writes it (advise_write.py): advice.csv, chosen.txt and, at region
  level, masks/<name>.png, which the adaptations read as data.train.files and data.train.label_regions.

Each returns its record's metrics: how many images and pixels are labelled, out of the pool's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tmtseg.errors import ConfigError, DataError
from tmtseg.tools import advise_write as write
from tmtseg.tools.advise import (
    Advice,
    class_shares,
    quantise_prob,
    region_cell,
    score_pool,
    split_pool,
    stored_prediction,
)
from tmtseg.tools.advise_select import RegionTable, Scores, choose, choose_regions, grid_regions

MAPS = ("u", "1-t", "w")  # the region scores kept: the maps a region strategy ranks by


def execute_selection(run) -> dict:
    """Run a plan's `score` or `select` run (tools/bench/plan.py) into its folder; return its metrics."""
    return score(run) if run.kind == "score" else select(run)


def _pool(run):
    return split_pool(run.cfg.data.train, run.cfg.data, key="data.train")


def score(run) -> dict:
    """Score the pool with the source model once; written to a folder beside run.out, then renamed: a killed run
    leaves no half-written scores."""
    from tmtseg.engine.restore import model_with_loss_from_checkpoint

    trainer, cfg, _ = model_with_loss_from_checkpoint(run.init)
    pool = _pool(run)
    tmp = run.out.with_name(run.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "ids").mkdir(parents=True)
    table = {m: RegionTable() for m in MAPS}
    shapes = []

    def add(i: int, s) -> None:
        ids = s.regions if s.regions is not None else grid_regions(s.u.shape, region_cell(cfg, pool.scale))
        np.savez_compressed(tmp / "ids" / f"{i}.npz", ids=ids.astype(np.int32), pred=s.pred,
                            conf=quantise_prob(s.conf))  # fmt: skip
        shapes.append(s.u.shape)
        for m, values in (("u", s.u), ("1-t", None if s.t is None else 1.0 - s.t), ("w", s.w)):
            if values is not None:
                table[m].add(i, ids, values)

    scores = score_pool(trainer, cfg, pool, amp="none", progress=None, each=add)
    none = np.full(len(pool), np.nan)
    np.savez(tmp / "scores.npz", u=scores.u, one_minus_t=none if scores.one_minus_t is None else scores.one_minus_t,
             w=none if scores.w is None else scores.w, features=scores.features, shapes=np.array(shapes),
             classes=scores.classes)  # fmt: skip
    columns = {f"score_{m}": np.array(t.score) for m, t in table.items() if len(t)}
    t = table["u"]
    np.savez(tmp / "regions.npz", image=np.array(t.image), region=np.array(t.region), pixels=np.array(t.pixels),
             **columns)  # fmt: skip
    shutil.rmtree(run.out, ignore_errors=True)
    tmp.rename(run.out)
    return {"pool_images": len(pool), "pool_pixels": int(np.prod(np.array(shapes), axis=1).sum())}


def load_scores(folder: Path) -> tuple[Scores, np.ndarray]:
    """The pool's Scores and image shapes [N, 2] a score run wrote."""
    try:
        z = np.load(folder / "scores.npz")
    except OSError as err:
        raise DataError(f"{folder}/scores.npz: the advisor's scores are missing ({err}); run the bench again") from None

    def column(name: str) -> np.ndarray | None:
        return None if np.isnan(z[name]).any() else z[name]

    classes = z["classes"] if "classes" in z else None
    scores = Scores(u=z["u"], one_minus_t=column("one_minus_t"), w=column("w"), features=z["features"], classes=classes)
    return scores, z["shapes"]


def stored_class_shares(folder: Path, n: int) -> np.ndarray:
    """[N, K] predicted class shares from the predictions a score run kept (for scores made before it saved them:
    the classes the model never predicted in the pool are left out at the end, which counts them for nothing)."""
    preds = [_prediction(folder, i)[0] for i in range(n)]
    k = max(int(p.max()) for p in preds) + 1
    return np.stack([class_shares(p, k) for p in preds])


def region_table(folder: Path, strategy: str) -> RegionTable:
    """The pool's regions scored by `strategy`'s map (random: U's, which it does not read)."""
    z = np.load(folder / "regions.npz")
    column = f"score_{'u' if strategy == 'random' else strategy}"
    if column not in z:  # advise refuses the same: the source model has no ACTE (1 - T) or TMA (W)
        raise ConfigError(f"select.strategy={strategy}: the source model has no ACTE / TMA map to rank regions by")
    return RegionTable.from_columns(image=z["image"], region=z["region"], pixels=z["pixels"], score=z[column])


def _prediction(folder: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The source model's prediction and probability of pool image i, kept by the score run."""
    z = np.load(folder / "ids" / f"{i}.npz")
    if "pred" not in z:
        raise DataError(f"{folder}: scores without the model's predictions (made before select.fill); delete the"
                        " folder and its line in results.jsonl, then rerun the bench")  # fmt: skip
    return stored_prediction(z)


def select(run) -> dict:
    """One choice from the score run's folder, written as `tmtseg advise` writes it (no contact sheet)."""
    sel, folder = run.select, Path(run.select["scores"])
    scores, shapes = load_scores(folder)
    pool = _pool(run)
    if len(pool) != len(scores):
        raise DataError(f"{folder}: scores of {len(scores)} images for a pool of {len(pool)}; delete it and rerun")
    shutil.rmtree(run.out, ignore_errors=True)
    run.out.mkdir(parents=True)
    pixels = np.prod(shapes, axis=1)  # [N]
    if sel["budget"]:
        if sel["strategy"] == "balanced" and scores.classes is None:
            scores.classes = stored_class_shares(folder, len(scores))
        chosen = choose(sel["strategy"], scores, sel["budget"], seed=sel["random_seed"])
        advice = Advice(pool.names, scores, sel["strategy"], chosen)
        write.image_advice(advice, pool, run.out, strategy=sel["strategy"], draw=None)
        return {"labelled_images": len(chosen), "labelled_pixels": int(pixels[chosen].sum()),
                "pool_images": len(pool), "pool_pixels": int(pixels.sum()),
                "chosen_u": float(scores.u[chosen].mean()), "pool_u": float(scores.u.mean())}  # fmt: skip
    table = region_table(folder, sel["strategy"])
    regions = choose_regions(table, sel["regions"], strategy=sel["strategy"], seed=sel["random_seed"])
    scores.features = None
    advice = Advice(pool.names, scores, sel["strategy"], regions=regions)
    write.region_advice(advice, pool, run.out, ids_of=lambda i: np.load(folder / "ids" / f"{i}.npz")["ids"],
                        pseudo_of=(lambda i: _prediction(folder, i)) if sel.get("fill") else None)  # fmt: skip
    # the U of the labelled pixels against the pool's (pixel-weighted means of the regions' mean U): a diagnostic
    u = table if sel["strategy"] in ("u", "random") else region_table(folder, "u")  # random's table holds U too
    taken = np.array([r in regions.get(i, ()) for i, r in zip(u.image, u.region, strict=True)])
    px, mean_u = np.array(u.pixels, dtype=np.float64), np.array(u.score)
    return {"labelled_images": len(regions), "labelled_pixels": int(px[taken].sum()), "pool_images": len(pool),
            "pool_pixels": int(pixels.sum()), "chosen_u": float((px * mean_u)[taken].sum() / px[taken].sum()),
            "pool_u": float((px * mean_u).sum() / px.sum())}  # fmt: skip
