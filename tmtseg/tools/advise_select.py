"""What to label, as plain functions of the scores (no model, no files): the image strategies of `tmtseg advise`, the
region choice of `--regions`, and the partial labels a region choice leaves (docs/advise.md).

Each strategy is `scores -> chosen indices`, in the order they were chosen, so that a bench can call them on scores it
computed once: `choose("u+diversity", Scores(u=..., features=...), k=10)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tmtseg.data.label_regions import partial_labels  # noqa: F401  (the region cut, here for the bench's callers)
from tmtseg.errors import ConfigError

STRATEGIES = ("u+diversity", "u", "1-t", "w", "coreset", "typical", "balanced", "random", "first")
# the best image strategy of the advise bench so far (docs/results.md §10.2, full schedules, day source, one seed):
# balanced, the mean of its margins over random across K = 16 and 64 and the two adaptations (+0.54; typical +0.20),
# and the one above random's spread where the ViT adapts (full fine-tuning: +1.96 at K = 16, +0.92 at 64)
DEFAULT_STRATEGY = "balanced"
REGION_STRATEGIES = ("u", "1-t", "w", "random")  # a region is ranked by the mean of a map, or at random


@dataclass
class Scores:
    """Per-image scores of a pool of N images, in the pool's order: mean U, mean 1 - T and mean W (None where the
    checkpoint has no ACTE / TMA), and one pooled ViT feature vector per image ([N, C])."""

    u: np.ndarray
    one_minus_t: np.ndarray | None = None
    w: np.ndarray | None = None
    features: np.ndarray | None = None
    # [N, C]: the share of each image's pixels the model predicts as each class (the `balanced` strategy's input)
    classes: np.ndarray | None = None
    # filled by `choose` for the distance-based strategies: each image's distance to the nearest chosen image (at the
    # moment it was chosen, for the chosen ones; 1 for the first), over twice the largest distance of a feature to the
    # pool's mean (a bound on any pairwise distance), so in [0, 1]
    distance: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.u)


def top_k(values: np.ndarray, k: int) -> list[int]:
    """The indices of the k largest values, largest first; ties go to the earlier image (stable)."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:k]]


def _distances(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return np.linalg.norm(features - centre[None], axis=1)  # [N]


def k_center(features: np.ndarray, k: int, *, weights: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy k-center (Sener & Savarese, 2018) on [N, C] features: each step takes the image farthest from the chosen
    ones; with `weights` ([N], e.g. U) it takes the largest weight x distance, so that an image as close as can be to
    a chosen one (a duplicate frame: distance 0) is only taken when nothing else is left. The first image is the one
    of largest weight, or without weights the one nearest the pool's mean (a representative, not an outlier).

    Returns the chosen indices in order and each image's normalised distance (see Scores.distance)."""
    feats = np.asarray(features, dtype=np.float64)
    n = len(feats)
    scale = max(float(np.linalg.norm(feats - feats.mean(0), axis=1).max()) * 2.0, 1e-12)  # >= any pairwise distance
    if weights is None:
        first = int(np.argmin(_distances(feats, feats.mean(0))))
    else:
        first = top_k(weights, 1)[0]
    chosen, at_choice = [first], {first: 1.0}
    nearest = _distances(feats, feats[first]) / scale  # [N], distance to the nearest chosen image
    while len(chosen) < min(k, n):
        gain = nearest if weights is None else np.asarray(weights, dtype=np.float64) * nearest
        gain = np.where(np.isin(np.arange(n), chosen), -np.inf, gain)
        best = top_k(gain, 1)[0]
        if weights is not None and gain[best] <= 0:  # only duplicates (or U = 0) left: the most uncertain of them
            rest = np.where(np.isin(np.arange(n), chosen), -np.inf, weights)
            best = top_k(rest, 1)[0]
        chosen.append(best)
        at_choice[best] = float(nearest[best])
        nearest = np.minimum(nearest, _distances(feats, feats[best]) / scale)
    out = nearest.copy()
    for i, d in at_choice.items():
        out[i] = d
    return chosen, np.clip(out, 0.0, 1.0)


def k_means(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on [N, C] points: each point's cluster id [N] (an emptied cluster takes
    the point farthest from its centre)."""
    rng = np.random.default_rng(seed)
    centres = [x[int(rng.integers(len(x)))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        centres.append(x[int(rng.choice(len(x), p=d2 / d2.sum()))] if d2.sum() > 0 else x[int(rng.integers(len(x)))])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)  # [k, C]
    ids = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        dist = ((x[:, None] - c[None]) ** 2).sum(-1)  # [N, k]
        new = dist.argmin(1)
        for j in range(k):
            members = x[new == j]
            if len(members):
                c[j] = members.mean(0)
            else:  # an empty cluster restarts at the worst-served point
                far = int(dist[np.arange(len(x)), new].argmax())
                c[j], new[far] = x[far], j
        if np.array_equal(new, ids):
            break
        ids = new
    return ids


def typical(features: np.ndarray, k: int, *, neighbours: int = 20, seed: int = 0) -> list[int]:
    """TypiClust (Hacohen et al., ICML 2022, "Active Learning on a Budget"): at small budgets labelling typical
    images beats labelling uncertain ones. The pool's L2-normalised features are cut into k clusters (k-means); from
    each cluster, largest first, the image of highest typicality (1 / the mean distance to its `neighbours` nearest
    images in the cluster) is taken: dense, representative frames rather than outliers or near-duplicates."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    k = min(k, len(x))
    ids = k_means(x, k, seed=seed)
    chosen = []
    for j in sorted(range(k), key=lambda j: (-int((ids == j).sum()), j)):
        members = np.flatnonzero(ids == j)
        if not len(members):
            continue
        dist = np.linalg.norm(x[members, None] - x[None, members], axis=-1)  # [m, m]
        m = min(neighbours, len(members) - 1)
        mean_nn = np.sort(dist, axis=1)[:, 1 : m + 1].mean(1) if m else np.zeros(len(members))
        chosen.append(int(members[int(np.argmin(mean_nn))]))  # the highest typicality: the smallest mean distance
    return chosen


def balanced(classes: np.ndarray, k: int) -> list[int]:
    """Class coverage: greedy, each step the image that adds most to sum_c sqrt(A_c / f_c), where A_c is the share of
    class c summed over the images chosen so far (from the model's prediction) and f_c its mean share in the pool.
    The square root gives diminishing returns per class, so that a class already covered weighs less than one not
    yet seen, and dividing by f_c counts a class in units of its own frequency, so that the rare classes (people,
    poles) are sought as much as road and sky. After class-balanced acquisition in active learning for segmentation
    (Cai et al., CVPR 2021, "Revisiting Superpixels for Active Learning in Semantic Segmentation with Realistic
    Annotation Costs"), which weighs uncertainty by the rarity of the predicted class; here uncertainty plays no
    part, since the entropy-picked frames of docs/results.md §10.1 miss the rare classes. Ties go to the earlier
    image."""
    a = np.asarray(classes, dtype=np.float64)  # [N, C]
    freq = a.mean(0)  # [C]
    a = np.where(
        freq > 0, a / np.where(freq > 0, freq, 1.0), 0.0
    )  # a class the model never predicts counts for nothing
    covered = np.zeros(a.shape[1])  # [C]
    taken = np.zeros(len(a), dtype=bool)
    chosen = []
    for _ in range(min(k, len(a))):
        gain = (np.sqrt(covered[None] + a) - np.sqrt(covered)[None]).sum(1)  # [N]
        gain[taken] = -np.inf
        best = top_k(gain, 1)[0]
        chosen.append(best)
        taken[best] = True
        covered += a[best]
    return chosen


def _need(scores: Scores, strategy: str) -> np.ndarray:
    values = {"u": scores.u, "1-t": scores.one_minus_t, "w": scores.w}[strategy]
    if values is None:
        raise ConfigError(
            f"--strategy {strategy}: the checkpoint has no ACTE transferability (method tmt has it); use u,"
            " u+diversity, coreset, random or first"
        )
    return values


def choose(strategy: str, scores: Scores, k: int, *, seed: int = 0) -> list[int]:
    """The k images `strategy` picks from the pool, best first (see STRATEGIES and docs/advise.md):

    u, 1-t, w: the k largest means; u+diversity: k-center weighted by U; coreset: plain k-center on the features;
    typical: the most typical image of each of k feature clusters (TypiClust); balanced: the images that cover the
    predicted classes best, rare ones counted by their frequency (see `balanced`); random: k at random with `seed`;
    first: the first k in the pool's order."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy}: choose from {', '.join(STRATEGIES)}")
    n = len(scores)
    if not 1 <= k <= n:
        raise ConfigError(f"--budget {k}: the pool holds {n} image(s); choose a budget from 1 to {n}")
    if strategy in ("u", "1-t", "w"):
        return top_k(_need(scores, strategy), k)
    if strategy == "first":
        return list(range(k))
    if strategy == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:k]]
    if strategy == "balanced":
        if scores.classes is None:
            raise ConfigError("--strategy balanced: needs the model's predicted class shares of each image")
        return balanced(scores.classes, k)
    if scores.features is None:
        raise ConfigError(f"--strategy {strategy}: needs the images' pooled features")
    if strategy == "typical":
        return typical(scores.features, k, seed=seed)
    weights = np.clip(scores.u, 0.0, None) if strategy == "u+diversity" else None
    chosen, scores.distance = k_center(scores.features, k, weights=weights)
    return chosen


# --------------------------------------------------------------------------------------------------- regions


class RegionTable:
    """Every region of the pool, flattened: its image's index, its id in that image's region map, its pixel count and
    its score (the mean of the strategy's map over it).

    The columns are numpy arrays grown by doubling (20 bytes a region), not Python lists (about 100 bytes a region in
    boxed numbers): a pool of 10 000 64x64 images in token-sized cells holds 640 000 regions, and this table is what
    the region mode keeps per image (benchmarks/memory_bounded.py)."""

    _COLUMNS = (("image", np.int32), ("region", np.int32), ("pixels", np.int32), ("score", np.float64))

    def __init__(self) -> None:
        self._n = 0
        self._cols = {name: np.empty(1024, dtype) for name, dtype in self._COLUMNS}

    def __len__(self) -> int:
        return self._n

    @classmethod
    def from_columns(cls, **columns: np.ndarray) -> RegionTable:
        """A table of regions already scored (image, region, pixels, score columns of one length): a bench's saved
        scores (tools/bench/selection.py)."""
        table = cls()
        n = len(columns["image"])
        table._cols = {name: np.asarray(columns[name], dtype) for name, dtype in cls._COLUMNS}
        if any(len(col) != n for col in table._cols.values()):
            raise ValueError(f"RegionTable columns of different lengths: {[len(c) for c in table._cols.values()]}")
        table._n = n
        return table

    image = property(lambda self: self._cols["image"][: self._n])
    region = property(lambda self: self._cols["region"][: self._n])
    pixels = property(lambda self: self._cols["pixels"][: self._n])
    score = property(lambda self: self._cols["score"][: self._n])

    def add(self, image: int, ids: np.ndarray, values: np.ndarray) -> None:
        """One image's regions: `ids` [H, W] region ids (>= 0), `values` [H, W] the map whose mean scores them."""
        flat = ids.reshape(-1)
        count = np.bincount(flat)
        total = np.bincount(flat, weights=values.reshape(-1).astype(np.float64), minlength=len(count))
        present = np.flatnonzero(count)
        rows = {"image": image, "region": present, "pixels": count[present], "score": total[present] / count[present]}
        end = self._n + len(present)
        if end > len(self._cols["image"]):
            for name, col in self._cols.items():
                grown = np.empty(max(end, 2 * len(col)), col.dtype)
                grown[: self._n] = col[: self._n]
                self._cols[name] = grown
        for name, col in self._cols.items():
            col[self._n : end] = rows[name]
        self._n = end


def choose_regions(table: RegionTable, percent: float, *, strategy: str = "u", seed: int = 0) -> dict[int, set[int]]:
    """Regions of highest score (or at random), taken until `percent` % of the pool's pixels are chosen: the region
    that crosses the mark is the last one. Returns image index -> its chosen region ids."""
    if not 0.0 < percent <= 100.0:
        raise ConfigError(f"--regions {percent}: a percentage of the pool's pixels in (0, 100]")
    if strategy not in REGION_STRATEGIES:
        raise ConfigError(f"--strategy {strategy} with --regions: choose from {', '.join(REGION_STRATEGIES)}")
    n = len(table)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(n)
    else:
        order = np.argsort(-table.score, kind="stable")  # top_k's order, without a list of n Python ints
    goal = percent / 100.0 * int(table.pixels.sum(dtype=np.int64))
    before = np.cumsum(table.pixels[order], dtype=np.int64) - table.pixels[order]  # pixels taken before each region
    picked = order[before < goal]  # every region that starts below the mark: the one crossing it is the last
    chosen: dict[int, set[int]] = {}
    for image, region in zip(table.image[picked].tolist(), table.region[picked].tolist(), strict=True):
        chosen.setdefault(image, set()).add(region)
    return chosen


def region_mask(ids: np.ndarray, chosen: set[int]) -> np.ndarray:
    """[H, W] region ids and the chosen ones -> a uint8 mask: 255 = label this region, 0 elsewhere."""
    return np.where(np.isin(ids, sorted(chosen)), 255, 0).astype(np.uint8)


def grid_regions(shape: tuple[int, int], cell: int) -> np.ndarray:
    """[H, W] ids of a regular grid of cell x cell squares (the last row and column may be smaller)."""
    h, w = shape
    cell = max(1, int(cell))
    cols = -(-w // cell)
    return (np.arange(h)[:, None] // cell) * cols + np.arange(w)[None, :] // cell
