"""Tables and plots of a benchmark: per pair and method mean ± std over seeds, Δ against the baseline, wins beyond the
seed spread, the mean over pairs, the cost of every method; a CSV and a JSON of every run."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRIC = "mIoU"  # the one number every pair has (binary tasks: the 2-class mIoU), so one mean over pairs exists


@dataclass
class Table:
    pairs: list[str]  # "task: a->b"
    methods: list[str]
    seeds: list[int]
    values: dict[tuple[str, str], dict[int, float]]  # (pair, method) -> seed -> score
    dice: dict[tuple[str, str], dict[int, float]]  # binary tasks: foreground Dice

    def scores(self, pair: str, method: str) -> np.ndarray:
        return np.array(list(self.values.get((pair, method), {}).values()), dtype=float)

    def delta(self, pair: str, method: str, baseline: str) -> np.ndarray:
        """Per-seed differences to the baseline (paired: the same seed starts from the same source model)."""
        a, b = self.values.get((pair, method), {}), self.values.get((pair, baseline), {})
        return np.array([a[s] - b[s] for s in a if s in b], dtype=float)


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def build_table(cells: list[tuple[str, str, str, int, str]], done: dict[str, dict]) -> Table:
    pairs, methods, seeds = [], [], []
    values: dict = {}
    dice: dict = {}
    for task, pair, method, seed, key in cells:
        name = f"{task}: {pair}"
        for lst, item in ((pairs, name), (methods, method), (seeds, seed)):
            if item not in lst:
                lst.append(item)
        rec = done.get(key)
        if rec is None:
            continue
        values.setdefault((name, method), {})[seed] = rec["metrics"][METRIC]
        if "dice" in rec["metrics"]:
            dice.setdefault((name, method), {})[seed] = rec["metrics"]["dice"]
    return Table(pairs=pairs, methods=methods, seeds=sorted(seeds), values=values, dice=dice)


def _fmt(x: np.ndarray, signed: bool = False) -> str:
    if len(x) == 0:
        return "–"
    mean = f"{x.mean():+.2f}" if signed else f"{x.mean():.2f}"
    return f"{mean} ± {_std(x):.2f}" if len(x) > 1 else mean


def wins(table: Table, method: str, baseline: str) -> tuple[int, int]:
    """(pairs where the method beats the baseline beyond the seed spread, pairs where it is the best adapted method
    beyond the spread of the runner-up). Beyond the spread: the mean paired Δ exceeds its std over seeds."""
    beat, best = 0, 0
    rivals = [m for m in table.methods if m not in ("target-only",)]
    for pair in table.pairs:
        d = table.delta(pair, method, baseline)
        if method != baseline and len(d) and d.mean() > _std(d):
            beat += 1
        if method in rivals and len(table.scores(pair, method)):
            others = [m for m in rivals if m != method and len(table.scores(pair, m))]
            diffs = [table.delta(pair, method, m) for m in others]
            if others and all(len(x) and x.mean() > _std(x) for x in diffs):
                best += 1
    return beat, best


def pair_mean(table: Table, method: str) -> np.ndarray:
    """Per seed, the mean over pairs (only seeds where every pair has a score)."""
    per_seed = []
    for s in table.seeds:
        vals = [table.values.get((p, method), {}).get(s) for p in table.pairs]
        if all(v is not None for v in vals):
            per_seed.append(float(np.mean(vals)))
    return np.array(per_seed)


def markdown(
    table: Table, records: list[dict], *, baseline: str, title: str, header: str = "", sessions: list[dict] = ()
) -> str:
    seeds = ", ".join(map(str, table.seeds))
    out = [f"# {title}", ""]
    if header:
        out += [header, ""]
    short = [p.split(": ", 1)[1] for p in table.pairs]
    out += [
        f"## {METRIC} on the target evaluation split (mean ± std over seeds {seeds})",
        "",
        "| method | " + " | ".join(short) + " | mean over pairs | Δ vs " + baseline + f" | > {baseline} | best |",
        "|---|" + "---:|" * (len(short) + 4),
    ]
    base_mean = pair_mean(table, baseline)
    for m in table.methods:
        row = [_fmt(table.scores(p, m)) for p in table.pairs]
        mean = pair_mean(table, m)
        d = mean - base_mean if len(mean) == len(base_mean) else np.array([])
        beat, best = wins(table, m, baseline)
        beat_s = "" if m == baseline else f"{beat}/{len(table.pairs)}"
        best_s = "" if m == "target-only" else f"{best}/{len(table.pairs)}"
        delta_s = "" if m == baseline else _fmt(d, signed=True)
        out.append(f"| {m} | " + " | ".join(row) + f" | {_fmt(mean)} | {delta_s} | {beat_s} | {best_s} |")
    out += [
        "",
        f"Δ vs {baseline} per pair (paired by seed: a seed's runs start from the same source model):",
        "",
        "| method | " + " | ".join(short) + " |",
        "|---|" + "---:|" * len(short),
    ]
    for m in table.methods:
        if m != baseline:
            out.append(
                f"| {m} | " + " | ".join(_fmt(table.delta(p, m, baseline), signed=True) for p in table.pairs) + " |"
            )
    out += [
        "",
        f"`> {baseline}`: pairs where the method's mean Δ exceeds the std of Δ over seeds; `best`: pairs where it "
        "beats "
        "every other method (target-only, an oracle, excluded) by more than that spread. With one seed there is no "
        "spread: any positive difference counts, so one-seed counts are indicative only.",
    ]
    if table.dice:
        dice_pairs = [p for p in table.pairs if any((p, m) in table.dice for m in table.methods)]
        out += ["", "## Foreground Dice (binary tasks)", "",
                "| method | " + " | ".join(p.split(": ", 1)[1] for p in dice_pairs) + " |",
                "|---|" + "---:|" * len(dice_pairs)]  # fmt: skip
        for m in table.methods:
            row = [_fmt(np.array(list(table.dice.get((p, m), {}).values()))) for p in dice_pairs]
            out.append(f"| {m} | " + " | ".join(row) + " |")
    out += ["", "## Cost per run (mean over runs)", "",
            "| method | runs | wall time (s) | training images/s | peak memory (MiB) |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    for m, rs in by_method.items():

        def avg(k: str, rs=rs) -> str:
            v = [r[k] for r in rs if r.get(k) is not None]
            return f"{np.mean(v):.1f}" if v else "–"

        out.append(f"| {m} | {len(rs)} | {avg('wall_s')} | {avg('imgs_per_s')} | {avg('peak_rss_mib')} |")
    walls = [r["wall_s"] for r in records if r.get("wall_s") is not None]
    out += ["", f"Run time: {len(walls)} of {len(records)} runs timed here, {sum(walls) / 3600:.2f} h in all "
            "(a run resumed from a checkpoint counts only its last part)."]  # fmt: skip
    if sessions:
        elapsed = sum(s["elapsed_s"] for s in sessions)
        loads = ", ".join(f"{s['load1']:.1f}" for s in sessions)
        out.append(
            f"Machine time of this output folder's bench invocations: {elapsed / 3600:.2f} h over {len(sessions)} "
            f"invocation(s) ({sum(s['runs'] for s in sessions)} runs finished; each until its last finished run; "
            f"{sessions[-1]['jobs']} runs at a time; load average at their last finished run: {loads})."
        )
    return "\n".join(out) + "\n"


def write_runs(records: list[dict], out: Path) -> None:
    """runs.json (every record whole) and runs.csv (one flat row per run)."""
    (out / "runs.json").write_text(json.dumps(records, indent=1))
    cols = ["key", "task", "pair", "method", "seed", "mIoU", "aAcc", "dice", "iou", "wall_s", "imgs_per_s",
            "peak_rss_mib", "threads", "commit", "dir"]  # fmt: skip
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, **{k: r["metrics"].get(k) for k in ("mIoU", "aAcc", "dice", "iou")}})


def plot(table: Table, out: Path, *, baseline: str) -> list[Path]:
    """pairs.png: per-pair bars with seed error bars; delta.png: Δ vs the baseline per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = method_colors(table.methods)  # a method keeps its colour in both plots
    paths = []
    for name, methods, fn, ylabel in (
        ("pairs.png", table.methods, lambda p, m: table.scores(p, m), f"{METRIC} (%)"),
        ("delta.png", [m for m in table.methods if m != baseline], lambda p, m: table.delta(p, m, baseline),
         f"Δ {METRIC} vs {baseline} (points)"),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(table.pairs) * max(1, len(methods)) / 4), 3.6))
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs, ys, es = [], [], []
            for i, p in enumerate(table.pairs):
                v = fn(p, m)
                if len(v):
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(v.mean())
                    es.append(_std(v))
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=color[m])
        ax.set_xticks(range(len(table.pairs)), [p.replace(": ", "\n") for p in table.pairs], fontsize=8)
        ax.set_ylabel(ylabel)
        if name == "delta.png":
            ax.axhline(0, color="black", lw=0.8)
        if methods:  # a bench of the baseline alone (the advise bench's quick profile) has no delta to draw
            ax.legend(fontsize=7, ncol=min(len(methods), 6), loc="best")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def method_colors(methods: list[str]) -> dict:
    """A colour per method, no two alike up to 20 methods (a core bench has 16)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(j % cmap.N) for j, m in enumerate(methods)}


def write_report(
    cells,
    done: dict[str, dict],
    order: list[str],
    out: Path,
    *,
    baseline: str,
    title: str,
    header: str = "",
    sessions: list[dict] = (),
) -> Path:
    """report.md, runs.csv and runs.json (every finished run, in `order`), pairs.png, delta.png in `out`; report.html:
    report.md and the plots in one self-contained page."""
    table = build_table(cells, done)
    records = [done[k] for k in order if k in done]
    text = markdown(table, records, baseline=baseline, title=title, header=header, sessions=sessions)
    (out / "report.md").write_text(text)
    write_runs(records, out)
    plots = []
    if any(not math.isnan(v) for d in table.values.values() for v in d.values()):
        plots = plot(table, out, baseline=baseline)
    (out / "report.html").write_text(html_page(text, plots))
    return out / "report.md"


def _inline(text: str) -> str:
    """Escape, then `code` spans -> <code>."""
    parts = html.escape(text, quote=False).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    head, rule, body = cells[0], cells[1], cells[2:]
    align = ["right" if c.endswith(":") else "left" for c in rule]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    for row in body:
        tds = "".join(f'<td style="text-align:{a}">{_inline(c)}</td>' for c, a in zip(row, align, strict=False))
        out.append(f"<tr>{tds}</tr>")
    return "\n".join(out + ["</table>"])


def html_page(text: str, images: list[Path]) -> str:
    """report.md's headings, paragraphs and tables, then the plots embedded as base64 PNGs: one self-contained page."""
    body, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            body.append(_html_table(lines[start:i]))
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    for path in images:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.name}'
                    "</figcaption></figure>")  # fmt: skip
    title = _inline(lines[0].lstrip("# ")) if lines else "report"
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}"
        "th{background:#f4f4f4}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
