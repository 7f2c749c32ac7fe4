"""The label-budget plot of a bench whose target domains say how many labelled images they hold (`labelled`, the budget
bench): per source domain, each method's score against the number of labelled target images (log x), the mean over
seeds with a ± std band."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tmtseg.tools.bench.tables import METRIC, Table, _std, method_colors


def budget_points(table: Table, sizes: dict[str, tuple[str, int]], method: str, source: str) -> list[tuple]:
    """(n, mean, std) over the table's pairs from `source`, by n; sizes: pair name -> (source domain, n)."""
    pts = []
    for pair in table.pairs:
        if pair in sizes and sizes[pair][0] == source:
            v = table.scores(pair, method)
            if len(v):
                pts.append((sizes[pair][1], float(v.mean()), _std(v)))
    return sorted(pts)


def plot_budget(table: Table, sizes: dict[str, tuple[str, int]], out: Path) -> Path | None:
    """budget.png in `out` (None when no target domain gives its labelled count)."""
    sources = sorted({s for s, _ in sizes.values()})
    sources = [s for s in sources if any(budget_points(table, sizes, m, s) for m in table.methods)]
    if not sources:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = method_colors(table.methods)
    fig, axes = plt.subplots(1, len(sources), figsize=(5.0 * len(sources), 3.8), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        for m in table.methods:
            pts = budget_points(table, sizes, m, source)
            if not pts:
                continue
            n, mean, std = (np.array(x) for x in zip(*pts, strict=True))
            ax.plot(n, mean, marker="o", label=m, color=color[m])
            ax.fill_between(n, mean - std, mean + std, color=color[m], alpha=0.15)
        ax.set_xscale("log")
        ticks = sorted({n for _, n in sizes.values()})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled target images")
        ax.set_ylabel(f"{METRIC} (%)")
        ax.set_title(f"from {source}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "budget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
