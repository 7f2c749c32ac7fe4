"""`tmtseg diagnose`'s JSON as the plain-text tables it prints."""

from __future__ import annotations

import numpy as np

# the region maps of section 1, as the table names them
_MAP_NAMES = {
    "acte": "ACTE regions: T",
    "acte_grid": "ACTE disc., fixed grid",
    "tvt": "TVT patches",
    "uncertainty": "ACTE regions: 1 - U",
    "importance": "ACTE regions: 1 - W",
}


def _f(x, d=3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def format_report(r: dict) -> str:
    """The JSON's numbers as plain-text tables."""
    lines = [f"data.val of {r['checkpoints']['tmt']}: {r['images']} images, {r['views']} views ({r['view']})", ""]
    lines += _transfer_lines(r["transferability_vs_source_error"], r["settings"]["low_t"])
    lines += _attention_lines(r["attention"])
    lines += _boundary_lines(r["boundary_recall"])
    return "\n".join(lines)


def _transfer_lines(transfer: dict, low: str | float) -> list[str]:
    lines = ["1. transferability vs the source model's error (Spearman of 1 - t and the error rate, per region)"]
    lines.append(f"  {'map':<26}{'regions':>8}{'rho':>8}{'p':>10}{'rho/image':>11}{'mean t':>8}{'std t':>8}")
    for k, s in transfer.items():
        p = "-" if s["p_value"] is None else f"{s['p_value']:.1e}"
        lines.append(
            f"  {_MAP_NAMES[k]:<26}{s['regions']:>8}{_f(s['spearman']):>8}{p:>10}"
            f"{_f(s['per_image_spearman_mean']):>11}{_f(s['mean_t']):>8}{_f(s['std_t']):>8}"
        )
    split = "the view's median" if low == "median" else f"{low}"
    lines.append(f"  error rate in ACTE regions of low / high t (t below / at or above {split}):")
    for m, e in transfer["acte"]["error_rate_by_t"].items():
        lines.append(f"    {m:<10} {_f(e['low_t'])} / {_f(e['high_t'])}")
    return lines


def _attention_lines(att: dict) -> list[str]:
    lines = ["", f"2. decoder cross-attention mass on low-T keys ({att['low_t']}); chance = share of such keys"]
    names = [k for k in ("tmt", "tmt_without_tma", "finetune") if k in att["layers"][0]]
    lines.append(
        f"  {'layer':<7}{'chance':>8}" + "".join(f"{n:>17}" for n in names) + f"{'TMA gap (nats)':>16}"
        + f"{'at lambda=1':>13}"
    )  # fmt: skip
    for row in att["layers"]:
        gap = row.get("tma_log_weight_gap_per_head")
        lines.append(
            f"  {row['layer']:<7}{_f(row['chance']):>8}" + "".join(f"{_f(row[n]):>17}" for n in names)
            + f"{_f(float(np.mean(gap)) if gap else None):>16}{_f(row.get('log_w_gap')):>13}"
        )  # fmt: skip
    lam = att["lambdas"]
    lines.append(
        f"  lambda per head (shared by the layers): {'-' if lam is None else ' '.join(f'{x:+.4f}' for x in lam)}"
    )
    for h in att["lambda_history"]:
        lines.append(f"    step {h['step']}: {' '.join(f'{x:+.4f}' for x in h['lambdas'])}")
    return lines


def _boundary_lines(b: dict) -> list[str]:
    chance = " / ".join(_f(x["chance_precision"]) for x in b["acte"])
    lines = [
        "",
        f"3. boundary recall of the regions against the label edges (precision in brackets; at random {chance})",
    ]
    lines.append(
        f"  {'regions':<9}" + "".join(f"{f'r = {t:.1f} px':>20}" for t in b["tolerances_px"])
        + f"{'boundary density':>18}{'pieces/region':>15}"
    )  # fmt: skip
    for k in ("acte", "grid"):
        lines.append(
            f"  {k:<9}" + "".join(f"{_f(x['recall']):>11} ({_f(x['precision'])})" for x in b[k])
            + f"{_f(b['boundary_density'][k]):>18}{_f(b['pieces_per_region'][k], 2):>15}"
        )  # fmt: skip
    lines.append(f"  ACTE's soft assignment: mean max_r a(p, r) = {_f(b['acte_mean_top_assignment'])} (1/9 = uniform)")
    return lines
