"""The advise bench (issue 27 §3): a target's labelled split chosen by `tmtseg advise` from a pool, each choice made
once and found again by its identity, the region labels cut to the chosen masks, the report's targets."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.tiny import TINY
from tmtseg.config import DataConfig, SplitConfig
from tmtseg.data.sources import list_source
from tmtseg.errors import ConfigError, DataError
from tmtseg.tools.advise_select import DEFAULT_STRATEGY
from tmtseg.tools.bench import load_bench, plan, run_bench
from tmtseg.tools.bench.advise_report import Point, target_rows
from tmtseg.tools.bench.selection import stored_class_shares

POOL = {"kind": "synthetic", "domain": "dusk", "seed": 2, "num_images": 6}
EVAL = {"kind": "synthetic", "domain": "dusk", "seed": 3, "num_images": 2}


def _bench_file(tmp_path: Path, targets: dict) -> Path:
    domains = {
        "day": {
            "train": {"kind": "synthetic", "domain": "day", "seed": 0, "num_images": 4},
            "val": {"kind": "synthetic", "domain": "day", "seed": 1, "num_images": 2},
        },
        **{name: {"adapt": POOL, "eval": EVAL, "select": sel} for name, sel in targets.items()},
    }
    cfg = {
        "name": "tiny-advise",
        "output_dir": str(tmp_path / "out"),
        "methods": ["finetune"],
        "profiles": {"quick": {"seeds": [0], "overrides": [*TINY, "train.log_every=1"]}},
        "tasks": {
            "synthetic": {
                "config": "demo.yaml",
                "source": ["train.iters=2"],
                "adapt": ["train.iters=1", "train.warmup_iters=0", "data.allow_missing_classes=true"],
                "domains": domains,
                "core_pairs": ["day->*"],
            }
        },
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _select(sel: dict) -> tuple:
    return sel["strategy"], sel["budget"] or sel["regions"], sel["draw"], sel.get("fill", "")


def test_the_advise_spec_plans_every_selection_once_per_source_and_seed_with_the_same_steps_per_size():
    bench, base = load_bench("advise", ["profile=full"])
    runs = plan(bench, base).runs
    kinds = Counter(r.kind for r in runs)
    assert kinds == {"train": 6 + 396, "score": 6, "select": 198}  # 2 sources x 3 seeds
    selects = [r for r in runs if r.kind == "select"]
    by_choice = Counter(_select(r.select) for r in selects)
    expected = {("u+diversity", 16, 0, ""), ("u", 16, 0, ""), ("coreset", 16, 0, ""), ("first", 16, 0, "")}
    expected |= {("typical", 16, 0, ""), ("balanced", 16, 0, "")}
    expected |= {(s, 64, 0, "") for s in ("u+diversity", "u", "coreset", "typical", "balanced", "first")}
    expected |= {("random", k, d, "") for k in (16, 32, 64, 128) for d in (0, 1, 2)}
    expected |= {(s, pct, 0, f) for s in ("u", "random") for pct in (1, 5) for f in ("", "pseudo")}
    expected |= {("u", 100, 0, "")}
    assert set(by_choice) == expected and set(by_choice.values()) == {6}
    by_key = {r.key: r for r in runs}
    for r in runs:
        if r.method not in ("finetune", "finetune-full"):
            continue
        sel = by_key[r.after]  # every adaptation waits for its selection, which waits for the pool's scores
        assert sel.kind == "select" and by_key[sel.after].kind == "score" and sel.seed == r.seed
        assert r.cfg.data.train.files == str(sel.out / "chosen.txt") and sel.out.parent.name == "selections"
        assert r.cfg.data.train.label_regions == (str(sel.out / "masks") if sel.select["regions"] else "")
        assert r.cfg.data.train.pseudo_labels == (str(sel.out / "pseudo") if sel.select.get("fill") else "")
        size = sel.select["budget"]
        assert r.cfg.train.iters == (60 if size in (16, 32) else 120)  # random 2K trains the steps of K
    # the draws of random are seeded apart, the same draw of another seed too
    seeds = {(r.seed, r.select["draw"]): r.select["random_seed"] for r in selects if r.select["strategy"] == "random"}
    assert len(set(seeds.values())) == len(seeds) == 9

    bench, base = load_bench("advise")  # quick: day, seed 0, K = 16, regions 5 % and the ceiling, finetune only
    runs = plan(bench, base).runs
    assert Counter(r.kind for r in runs) == {"train": 1 + 13, "score": 1, "select": 13}
    assert {r.method for r in runs if r.kind == "train"} == {"source", "finetune"}
    assert sorted(_select(r.select) for r in runs if r.kind == "select") == sorted(
        [
            ("first", 16, 0, ""),
            ("random", 16, 0, ""),
            ("random", 16, 1, ""),
            ("random", 16, 2, ""),
            ("random", 5, 0, ""),
            ("random", 5, 0, "pseudo"),
            ("u", 5, 0, ""),
            ("u", 5, 0, "pseudo"),
            ("u", 16, 0, ""),
            ("u", 100, 0, ""),
            ("typical", 16, 0, ""),
            ("balanced", 16, 0, ""),  # the default strategy: the quick report checks it
            ("u+diversity", 16, 0, ""),
        ]  # fmt: skip
    )
    assert {r.cfg.train.iters for r in runs if r.method == "finetune"} == {24, 48}


def test_a_selection_names_a_strategy_of_its_level_and_one_size(tmp_path):
    for sel, match in (
        ({"strategy": "u", "budget": 2, "regions": 5}, "one of the two"),
        ({"strategy": "coreset", "regions": 5}, "strategy='coreset'"),
        ({"budget": 3}, "without a strategy"),
        ({"strategy": "u", "budget": 2, "fill": "pseudo"}, "pseudo only at region level"),
        ({"strategy": "u", "regions": 5, "fill": "teacher"}, "fill='teacher'"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_bench(str(_bench_file(tmp_path, {"t": sel})))


def _masks(folder: Path, names: list[str], shape: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        mask = np.zeros(shape, dtype=np.uint8)
        mask[:, : shape[1] // 2] = 255  # the left half is labelled
        Image.fromarray(mask).save(folder / f"{n}.png")


def test_label_regions_keep_the_ground_truth_only_inside_the_mask(tmp_path):
    data = DataConfig()
    split = SplitConfig(kind="synthetic", domain="dusk", seed=2, num_images=3)
    full = list_source(split, data)
    names = [r.name for r in full.records]
    shape = full.decoder(full.records[0])[1].shape
    _masks(tmp_path / "masks", names, (shape[0] // 2, shape[1] // 2))  # half size: resized by nearest neighbour
    cut = list_source(SplitConfig(**{**split.__dict__, "label_regions": str(tmp_path / "masks")}), data)
    for rec in full.records:
        image, label = full.decoder(rec)
        image2, part = cut.decoder(rec)
        left = shape[1] // 2
        assert np.array_equal(image, image2)  # the model still sees the whole image
        assert np.array_equal(part[:, :left], label[:, :left]) and (part[:, left:] == data.ignore_index).all()
        assert (label[:, left:] != data.ignore_index).any()  # there was ground truth to drop
    with pytest.raises(ConfigError, match="label_regions=.*not a folder"):
        list_source(SplitConfig(**{**split.__dict__, "label_regions": str(tmp_path / "none")}), data)
    (tmp_path / "masks" / f"{names[1]}.png").unlink()
    with pytest.raises(DataError, match=f"no region mask for image '{names[1]}'"):
        cut.decoder(full.records[1])


def test_pseudo_labels_fill_the_pixels_outside_the_mask_and_need_label_regions(tmp_path):
    data = DataConfig()
    split = SplitConfig(kind="synthetic", domain="dusk", seed=2, num_images=2)
    full = list_source(split, data)
    names = [r.name for r in full.records]
    shape = full.decoder(full.records[0])[1].shape
    _masks(tmp_path / "masks", names, shape)
    (tmp_path / "pseudo").mkdir()
    for k, n in enumerate(names):  # a constant "prediction" per image, none (255) in the bottom rows
        fill = np.full(shape, k + 1, dtype=np.uint8)
        fill[-3:] = 255
        Image.fromarray(fill).save(tmp_path / "pseudo" / f"{n}.png")
    keys = {"label_regions": str(tmp_path / "masks"), "pseudo_labels": str(tmp_path / "pseudo")}
    cut = list_source(SplitConfig(**{**split.__dict__, **keys}), data)
    left = shape[1] // 2
    for k, rec in enumerate(full.records):
        label, filled = full.decoder(rec)[1], cut.decoder(rec)[1]
        assert np.array_equal(filled[:, :left], label[:, :left])  # the labeller's part: the ground truth
        assert (filled[:-3, left:] == k + 1).all() and (filled[-3:, left:] == 255).all()  # outside: the fill
    with pytest.raises(ConfigError, match="pseudo_labels: fills the pixels outside"):
        list_source(SplitConfig(**{**split.__dict__, "pseudo_labels": str(tmp_path / "pseudo")}), data)
    with pytest.raises(ConfigError, match="pseudo_labels=.*not a folder"):
        list_source(SplitConfig(**{**split.__dict__, **keys, "pseudo_labels": str(tmp_path / "no")}), data)
    (tmp_path / "pseudo" / f"{names[0]}.png").unlink()
    with pytest.raises(DataError, match=f"no pseudo-label for image '{names[0]}'"):
        cut.decoder(full.records[0])


class InProcess:
    """A launcher running each run here, at once (the process launchers are tested in test_bench*.py): the bench's
    logic without a process start per run."""

    slots, threads = 1, torch.get_num_threads()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def submit(self, fn, run):
        future: Future = Future()
        future.set_result(fn(run, self.threads))
        return future

    def finished(self, handles, timeout=0.0):
        return set(handles)

    def result(self, handle, run):
        return handle.result()


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_a_tiny_advise_bench_selects_once_and_adapts_on_the_chosen_images_and_regions(tmp_path, monkeypatch):
    monkeypatch.setattr("tmtseg.tools.bench.run.make_launcher", lambda bench: InProcess())
    targets = {"ud2": {"strategy": "u+diversity", "budget": 2}, "reg": {"strategy": "u", "regions": 20},
               "regfill": {"strategy": "u", "regions": 20, "fill": "pseudo"}}  # fmt: skip
    bench, base = load_bench(str(_bench_file(tmp_path, targets)))
    report = run_bench(bench, base, progress=False)
    out = Path(bench.output_dir)
    recs = {r["key"]: r for r in _records(out)}
    assert Counter(r["kind"] for r in recs.values()) == {"train": 4, "score": 1, "select": 3}
    runs = {r.key: r for r in plan(bench, base).runs}
    # image level: the adaptation reads exactly the two images the selection chose
    ud = runs["synthetic/day->ud2/finetune/seed0"]
    chosen = [x for x in Path(ud.cfg.data.train.files).read_text().splitlines() if not x.startswith("#")]
    assert len(chosen) == 2 and [r.name for r in list_source(ud.cfg.data.train, ud.cfg.data).records] == sorted(chosen)
    sel = recs["synthetic/day->ud2/select/seed0"]["metrics"]
    assert sel["labelled_images"] == 2 and sel["labelled_pixels"] == 2 * sel["pool_pixels"] // 6
    # region level: about 20 % of the pool's pixels, the labels cut to the chosen regions
    reg = runs["synthetic/day->reg/finetune/seed0"]
    m = recs["synthetic/day->reg/select/seed0"]["metrics"]
    assert 0.2 <= m["labelled_pixels"] / m["pool_pixels"] < 0.3
    source = list_source(reg.cfg.data.train, reg.cfg.data)
    kept = sum(int((source.decoder(r)[1] != 255).sum()) for r in source.records)
    assert 0 < kept <= m["labelled_pixels"]  # the synthetic scenes have void of their own
    assert recs["synthetic/day->reg/finetune/seed0"]["metrics"]["mIoU"] >= 0.0
    # the same regions filled with the source model's prediction: one more selection from the same scores, and
    # its labels are the ground truth inside the regions and the prediction (a class id) everywhere outside them
    fill = runs["synthetic/day->regfill/finetune/seed0"]
    assert fill.cfg.data.train.pseudo_labels == str(Path(fill.cfg.data.train.label_regions).parent / "pseudo")
    src = list_source(fill.cfg.data.train, fill.cfg.data)
    for r in src.records:
        filled, cut = src.decoder(r)[1], source.decoder(r)[1]
        mask = np.asarray(Image.open(Path(fill.cfg.data.train.label_regions) / f"{r.name}.png"))
        assert np.array_equal(filled[mask > 0], cut[mask > 0]) and (filled[mask == 0] < 5).all()
    text = report.read_text()
    assert "## The advise bench" in text and "| day | finetune | regions u | 20% |" in text
    assert (out / "advise.png").stat().st_size > 1000

    # again, with one more target: the pool is not scored again, the finished selections are not redone
    scores = next((out / "selections").glob("scores-*")) / "scores.npz"
    stamp = scores.stat().st_mtime_ns
    targets["r2"] = {"strategy": "random", "budget": 2, "draw": 1}
    targets["b2"] = {"strategy": "balanced", "budget": 2}  # reads the class shares the score run kept
    bench, base = load_bench(str(_bench_file(tmp_path, targets)))
    run_bench(bench, base, progress=False)
    new = _records(out)[len(recs) :]
    assert sorted(r["key"] for r in new) == [f"synthetic/day->{t}/{k}/seed0" for t in ("b2", "r2")
                                             for k in ("finetune", "select")]  # fmt: skip
    assert scores.stat().st_mtime_ns == stamp
    shares = np.load(scores)["classes"]  # [6, 5]: every pixel of every pool image predicted as some class
    assert shares.shape == (6, 5) and np.allclose(shares.sum(1), 1.0)
    # scores made before the shares were kept: the same shares from the kept predictions (up to the last class seen)
    old = stored_class_shares(scores.parent, 6)
    assert np.allclose(old, shares[:, : old.shape[1]]) and not shares[:, old.shape[1] :].any()


def test_random_draws_differ_by_draw_and_repeat_for_the_same_one(tmp_path):
    from tmtseg.tools.bench.selection import select

    bench, base = load_bench(str(_bench_file(tmp_path, {
        f"r{d}": {"strategy": "random", "budget": 3, "draw": d} for d in (0, 1)})))  # fmt: skip
    runs = [r for r in plan(bench, base).runs if r.kind == "select"]
    folder = Path(runs[0].select["scores"])  # the scores of a pool of 6, as a score run leaves them
    folder.mkdir(parents=True)
    np.savez(folder / "scores.npz", u=np.linspace(0, 1, 6), one_minus_t=np.full(6, np.nan), w=np.full(6, np.nan),
             features=np.eye(6), shapes=np.full((6, 2), 8))  # fmt: skip
    chosen = []
    for r in [*runs, runs[0]]:
        select(r)
        chosen.append((r.out / "chosen.txt").read_text())
    assert chosen[0] != chosen[1] and chosen[0] == chosen[2]
    assert runs[0].out != runs[1].out  # the draw is part of the selection's identity


def _pt(line, size, seed, score, draw=0, source="day"):
    return Point(source, "finetune", line, size, seed, draw, score, 1000.0 * size, 0.5, 0.4)


def test_the_targets_pair_by_seed_average_random_draws_and_say_why_when_missed():
    pts = [_pt(DEFAULT_STRATEGY, 16, s, 50.0 + s) for s in (0, 1)]
    pts += [_pt("random", 16, s, v, draw=d) for s in (0, 1) for d, v in enumerate((47.0 + s, 48.0 + s, 49.0 + s))]
    pts += [_pt("random", 32, s, 51.0 + s, draw=d) for s in (0, 1) for d in range(3)]
    pts += [_pt("regions u", 5, s, 40.0) for s in (0, 1)] + [_pt("all pixels", 100, s, 50.0) for s in (0, 1)]
    rows = {r.split(" | ")[1]: r for r in target_rows(pts, "finetune")}
    k16 = rows[f"{DEFAULT_STRATEGY} K=16 − random K=16"]
    assert "+2.00 ± 0.00 (n=2)" in k16 and "| met |" in k16  # 50 - mean(47, 48, 49), paired by seed
    k32 = rows[f"{DEFAULT_STRATEGY} K=16 − random K=32"]
    assert "-1.00" in k32 and "not met" in k32 and "chosen U 0.500 vs pool 0.400" in k32
    assert "80.0 ± 0.0" in rows["regions u 5% / all pixels (%)"] and "not met" in rows["regions u 5% / all pixels (%)"]
    assert "not run" in rows[f"{DEFAULT_STRATEGY} K=64 − random K=64"]
    # the filled regions are checked on their own, against random regions filled alike
    pts += [_pt("regions u + pseudo", 1, s, 45.0) for s in (0, 1)] + [_pt("regions random", 1, s, 44.0) for s in (0, 1)]
    pts += [_pt("regions random + pseudo", 1, s, 41.0) for s in (0, 1)]
    rows = {r.split(" | ")[1]: r for r in target_rows(pts, "finetune")}
    filled = rows["regions u + pseudo 1% − regions random + pseudo 1%"]
    assert "+4.00" in filled and "| met |" in filled
    assert (
        "not run" in rows["regions u 1% − regions random 1%"]
        and "not run" in rows["regions u + pseudo 5% / all pixels (%)"]
    )


def test_a_changed_region_mask_changes_the_splits_recorded_input(tmp_path):
    from tmtseg.config import Config
    from tmtseg.engine.inputs import split_input

    cfg = Config()
    cfg.data.train = SplitConfig(kind="synthetic", domain="dusk", seed=2, num_images=2)
    whole = split_input(cfg, "train")["sha256"]
    names = [r.name for r in list_source(cfg.data.train, cfg.data).records]
    _masks(tmp_path / "masks", names, (8, 8))
    cfg.data.train.label_regions = str(tmp_path / "masks")
    before = split_input(cfg, "train")["sha256"]
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 4:] = 255  # the other half: the same size, other regions
    Image.fromarray(mask).save(tmp_path / "masks" / f"{names[0]}.png")
    after = split_input(cfg, "train")["sha256"]
    assert len({whole, before, after}) == 3
