"""The advise bench's part of the report (docs/advise.md, "The advise bench"): every selection's score against the
pixels it labelled (advise.png, log x, mean ± std over seeds and draws), a table of the selections, and the issue's
targets with their deltas paired by seed (random = the mean over its draws), met or not, and a diagnostic where not.

A selected target's labelled pixels come from its select run's record (tools/bench/selection.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmtseg.tools.advise_select import DEFAULT_STRATEGY
from tmtseg.tools.bench.spec import BenchConfig, Selection
from tmtseg.tools.bench.tables import METRIC, _std

CEILING = "all pixels"
MATCH_TOLERANCE = 0.5  # "matches random at 2K": the advisor's K at most this many points below random's 2K


@dataclass
class Point:
    """One adapted run of a selected target: its source, method, line (strategy and level), size (K or %), seed,
    draw, score and the labelled pixels and U diagnostics of its selection."""

    source: str
    method: str
    line: str
    size: float
    seed: int
    draw: int
    score: float
    pixels: float
    chosen_u: float = float("nan")
    pool_u: float = float("nan")


def line_of(sel: Selection) -> str:
    """The plot's line of a selection: its strategy (image level), `regions <strategy>`, or the ceiling."""
    if sel.budget:
        return sel.strategy
    fill = " + pseudo" if sel.fill else ""  # the pixels outside the regions filled with the source's prediction
    return CEILING if sel.regions >= 100.0 else f"regions {sel.strategy}{fill}"


def points(bench: BenchConfig, cells, done: dict[str, dict]) -> list[Point]:
    """Every finished adaptation of a selected target whose selection is recorded too."""
    out = []
    for task, pair, method, seed, key in cells:
        a, _, b = pair.partition("->")
        sel = bench.tasks[task].domains[b].select if b in bench.tasks[task].domains else Selection()
        chosen = done.get(f"{task}/{pair}/select/seed{seed}")
        if not sel.strategy or key not in done or chosen is None:
            continue
        m = chosen["metrics"]
        size = float(sel.budget or sel.regions)
        out.append(Point(a, method, line_of(sel), size, seed, sel.draw, done[key]["metrics"][METRIC],
                         m["labelled_pixels"], m.get("chosen_u", np.nan), m.get("pool_u", np.nan)))  # fmt: skip
    return out


def _by_seed(pts: list[Point], method: str, line: str, size: float) -> dict[tuple[str, int], float]:
    """(source, seed) -> the score, the mean over draws."""
    acc: dict[tuple[str, int], list[float]] = {}
    for p in pts:
        if (p.method, p.line, p.size) == (method, line, size):
            acc.setdefault((p.source, p.seed), []).append(p.score)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _draw_spread(pts: list[Point], method: str, line: str, size: float) -> float:
    """The std of a random line's scores over its draws, the mean over (source, seed): the luck of the draw."""
    acc: dict[tuple[str, int], list[float]] = {}
    for p in pts:
        if (p.method, p.line, p.size) == (method, line, size):
            acc.setdefault((p.source, p.seed), []).append(p.score)
    spreads = [_std(np.array(v)) for v in acc.values() if len(v) > 1]
    return float(np.mean(spreads)) if spreads else float("nan")


def _paired(a: dict, b: dict, *, ratio: bool = False) -> np.ndarray:
    return np.array([(a[k] / b[k] * 100.0 if ratio else a[k] - b[k]) for k in a if k in b], dtype=float)


def _u_note(pts: list[Point], method: str, line: str, size: float) -> str:
    us = [(p.chosen_u, p.pool_u) for p in pts if (p.method, p.line, p.size) == (method, line, size)]
    if not us:
        return ""
    chosen, pool = np.nanmean([u[0] for u in us]), np.nanmean([u[1] for u in us])
    return f"chosen U {chosen:.3f} vs pool {pool:.3f}"


def target_rows(pts: list[Point], method: str) -> list[str]:
    """The issue's targets for one adaptation method, each as a markdown row."""
    # the advisor's region lines (with and without the pseudo-label fill), each against random regions filled alike
    regions = sorted({p.line for p in pts if p.line.startswith("regions ") and not p.line.startswith("regions random")})
    rows = []
    checks = [(f"{DEFAULT_STRATEGY} K={k} − random K={k}", (DEFAULT_STRATEGY, k), ("random", k), 1.5, False)
              for k in (16, 64)]  # fmt: skip
    checks += [(f"{DEFAULT_STRATEGY} K={k} − random K={2 * k}", (DEFAULT_STRATEGY, k), ("random", 2 * k),
                -MATCH_TOLERANCE, False) for k in (16, 64)]  # fmt: skip
    for region in regions or ["regions (advisor)"]:
        rand = "regions random" + (" + pseudo" if region.endswith(" + pseudo") else "")
        checks += [(f"{region} 5% / all pixels (%)", (region, 5), (CEILING, 100), 95.0, True),
                   (f"{region} 1% − {rand} 1%", (region, 1), (rand, 1), 3.0, False)]  # fmt: skip
    for name, (line, size), (other, osize), goal, ratio in checks:
        mine, theirs = _by_seed(pts, method, line, size), _by_seed(pts, method, other, osize)
        d = _paired(mine, theirs, ratio=ratio)
        target = f"≥ {goal:.0f}%" if ratio else f"≥ {goal:+.1f}"
        if not len(d):
            rows.append(f"| {method} | {name} | – | {target} | not run |  |")
            continue
        met = float(d.mean()) >= goal
        why = ""
        if not met:
            spread = _draw_spread(pts, method, other, osize)
            parts = [_u_note(pts, method, line, size)]
            if not np.isnan(spread):
                parts.append(f"random's draws spread {spread:.2f}")
            if len(d) > 1 and abs(d.mean()) <= _std(d):
                parts.append("Δ within its own spread over seeds")
            why = "; ".join(p for p in parts if p)
        value = f"{d.mean():+.2f} ± {_std(d):.2f} (n={len(d)})" if not ratio else f"{d.mean():.1f} ± {_std(d):.1f}"
        rows.append(f"| {method} | {name} | {value} | {target} | {'met' if met else 'not met'} | {why} |")
    return rows


def selection_rows(pts: list[Point]) -> list[str]:
    """Per source, method, line and size: labelled pixels (mean) and the score, mean ± std over seeds and draws."""
    keys = sorted({(p.source, p.method, p.line, p.size) for p in pts})
    rows = []
    for source, method, line, size in keys:
        group = [p for p in pts if (p.source, p.method, p.line, p.size) == (source, method, line, size)]
        v = np.array([p.score for p in group])
        px = np.mean([p.pixels for p in group])
        size_txt = f"K={size:g}" if not line.startswith("regions") and line != CEILING else f"{size:g}%"
        rows.append(f"| {source} | {method} | {line} | {size_txt} | {px:,.0f} | {v.mean():.2f} ± {_std(v):.2f} "
                    f"| {len(v)} |")  # fmt: skip
    return rows


def markdown(pts: list[Point], methods: list[str]) -> str:
    out = [
        "",
        "## The advise bench: labelled pixels and the targets",
        "",
        f"{METRIC} of every selection (mean ± std over seeds and random draws; advise.png draws it against the"
        " labelled pixels):",
        "",
        "| source | method | selection | size | labelled pixels | mIoU | runs |",
        "|---|---|---|---|---:|---:|---:|",
        *selection_rows(pts),
        "",
        "Targets (mean over sources and seeds; Δ paired by seed, random = the mean over its draws; `matches` random"
        f" at 2K = at most {MATCH_TOLERANCE} points below it):",
        "",
        "| method | comparison | Δ | target | verdict | diagnostics |",
        "|---|---|---:|---:|---|---|",
    ]
    for m in methods:
        if any(p.method == m for p in pts):
            out += target_rows(pts, m)
    return "\n".join(out) + "\n"


def plot_advise(pts: list[Point], out: Path) -> Path | None:
    """advise.png: per source and method, each selection line's score against its labelled pixels (log x), the
    mean with a ± std band over seeds and draws; the ceiling as a dashed level."""
    panels = sorted({(p.source, p.method) for p in pts})
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted({p.line for p in pts})
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (source, method) in zip(axes[0], panels, strict=True):
        for j, line in enumerate(lines):
            group = [p for p in pts if (p.source, p.method, p.line) == (source, method, line)]
            sizes = sorted({p.size for p in group})
            if not sizes:
                continue
            xs = np.array([np.mean([p.pixels for p in group if p.size == s]) for s in sizes])
            vs = [np.array([p.score for p in group if p.size == s]) for s in sizes]
            mean, std = np.array([v.mean() for v in vs]), np.array([_std(v) for v in vs])
            if line == CEILING:
                ax.axhline(mean[0], color="black", ls="--", lw=1, label=CEILING)
                continue
            ax.plot(xs, mean, marker="o", label=line, color=cmap(j % 10))
            ax.fill_between(xs, mean - std, mean + std, color=cmap(j % 10), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("labelled target pixels")
        ax.set_ylabel(f"{METRIC} (%)")
        ax.set_title(f"{method}, from {source}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "advise.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def advise_report(bench: BenchConfig, cells, done: dict[str, dict], out: Path) -> list[Path]:
    """Append the advise section to report.md and write advise.png; nothing for a bench without selections."""
    pts = points(bench, cells, done)
    if not pts:
        return []
    with open(out / "report.md", "a") as f:
        f.write(markdown(pts, bench.methods))
    path = plot_advise(pts, out)
    return [path] if path else []
