"""The budget bench (issue 26): its plan on the real IDD-Lite frames and its plot. A module of its own: the plan of the
full profile is most of a minute, and pytest-xdist hands out whole modules (pyproject's addopts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmtseg.tools.bench import load_bench, plan


def test_the_budget_bench_labels_the_first_n_idd_frames_by_order_and_grows_steps_with_n(shared_data):
    """bench budget: n in {16, 128, 1403} labelled IDD-Lite train frames, the first n in the loader's order (by file
    name, IDD's frame id, as every manifest split is listed; never random), scored on all of IDD-Lite val; the
    adaptation steps grow with n; the quick profile is the day source only."""
    import csv

    from tmtseg.data.sources import list_source

    with open(shared_data / "idd-lite" / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["suggested_role"] == "source_train"]
    rows.sort(key=lambda r: (Path(r["image"]).name, r["image"]))
    # LoRA's runs of seed 0 alone (its own baseline): the steps, frames and pairs checked are the same for every method
    # and seed, and the full profile's 3 seeds x 11 methods were most of a minute of planning
    for profile, steps in (("full", {16: 60, 128: 150, 1403: 300}), ("quick", {16: 24, 128: 60, 1403: 120})):
        only = ["methods=[lora]", "baseline=lora", f"profiles.{profile}.seeds=[0]"]
        bench, base = load_bench("budget", [f"data_root={shared_data}", f"profile={profile}", *only])
        runs = plan(bench, base).runs
        for n, iters in steps.items():
            run = next(r for r in runs if r.key == f"budget/day->idd{n}/lora/seed0")
            assert run.cfg.train.iters == iters
            files = [rec.image for rec in list_source(run.cfg.data.train, run.cfg.data).records]
            assert [str(f).removeprefix(str(shared_data / "idd-lite") + "/") for f in files] == [
                r["image"] for r in rows[:n]
            ]
            val = list_source(run.cfg.data.val, run.cfg.data).records
            assert len(val) == 204
        pairs = {r.pair for r in runs if r.method == "lora"}
        assert pairs == ({"day->idd16", "day->idd128", "day->idd1403"} if profile == "quick" else
                         {f"{s}->idd{n}" for s in ("day", "dusk") for n in (16, 128, 1403)})  # fmt: skip


def test_the_budget_plot_draws_each_method_against_the_labelled_count_per_source(tmp_path):
    from tmtseg.tools.bench.curves import budget_points, plot_budget
    from tmtseg.tools.bench.tables import Table

    pairs = ["b: day->t16", "b: day->t128", "b: dusk->t16"]
    values = {("b: day->t128", "lora"): {0: 50.0, 1: 52.0}, ("b: day->t16", "lora"): {0: 40.0, 1: 42.0},
              ("b: dusk->t16", "lora"): {0: 30.0}}  # fmt: skip
    table = Table(pairs=pairs, methods=["lora", "finetune"], seeds=[0, 1], values=values, dice={})
    sizes = {"b: day->t16": ("day", 16), "b: day->t128": ("day", 128), "b: dusk->t16": ("dusk", 16)}
    pts = budget_points(table, sizes, "lora", "day")
    assert [(n, m) for n, m, _ in pts] == [(16, 41.0), (128, 51.0)] and pts[0][2] == pytest.approx(2**0.5)
    assert budget_points(table, sizes, "finetune", "day") == []
    path = plot_budget(table, sizes, tmp_path)
    assert path == tmp_path / "budget.png" and path.stat().st_size > 1000
    assert plot_budget(table, {}, tmp_path / "none") is None
