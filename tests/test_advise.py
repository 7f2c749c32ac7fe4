"""`tmtseg advise` (issue 27): the ranking follows the score, diversity keeps near-duplicate frames out, the budget and
the output folder are checked, the chosen images go straight into `finetune` (data.train.files), and region masks
cover the asked share of the pool's pixels. Tiny models with random weights (tests/tiny.py): seconds each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tmtseg
from tmtseg.adapt.build import build_model_with_loss
from tmtseg.cli import main
from tmtseg.config import SplitConfig, load_config
from tmtseg.data import build_dataset
from tmtseg.engine.restore import checkpoint_meta
from tmtseg.errors import ConfigError, DataError
from tmtseg.io.checkpoint import save_checkpoint
from tmtseg.tools import advise as advise_mod
from tmtseg.tools.advise_select import RegionTable, Scores, choose, choose_regions, grid_regions, partial_labels
from tmtseg.tools.advise_write import partial_labels_from

from .tiny import TINY

BASE = [*TINY, "data.train.domain=dusk", "data.train.num_images=4", "data.val.num_images=2"]
CLASSES = ["sky", "road", "building", "tree", "car"]


def _save(root: Path, method: str) -> Path:
    cfg = load_config([], [*BASE, f"adapt.method={method}", f"output_dir={root}"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg, pretrained=False)
    meta = checkpoint_meta(cfg, build_dataset(cfg.data.train, cfg.data, train=False), method=method)
    save_checkpoint(root, step=1, model=trainer, meta=meta, name="best")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("advise")
    return {"source": _save(root / "source", "finetune"), "tmt": _save(root / "tmt", "tmt")}


def _dataset(root: Path, n: int = 4, size=(32, 40)) -> Path:
    """A folder dataset of `n` images (grey level 40 * i, so each is told apart) with masks of all 5 classes."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))
    mask = np.repeat(np.arange(size[1]) * 5 // size[1], size[0]).reshape(size[1], size[0]).T.astype(np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = np.clip(rng.integers(0, 40, (*size, 3)) + 40 * i, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    return root


# --------------------------------------------------------------------------------------------- the plain functions


def test_each_strategy_picks_by_its_own_score():
    u, t, w = np.array([0.1, 0.9, 0.5, 0.7]), np.array([0.8, 0.0, 0.2, 0.1]), np.array([0.3, 0.2, 0.9, 0.1])
    scores = Scores(u=u, one_minus_t=t, w=w, features=np.eye(4))
    assert choose("u", scores, 2) == [1, 3]
    assert choose("1-t", scores, 2) == [0, 2]
    assert choose("w", scores, 1) == [2]
    assert choose("first", scores, 3) == [0, 1, 2]
    assert choose("random", scores, 4, seed=1) == choose("random", scores, 4, seed=1)
    assert sorted(choose("random", scores, 4, seed=1)) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="ACTE"):
        choose("1-t", Scores(u=u, features=np.eye(4)), 1)
    with pytest.raises(ConfigError, match="holds 4"):
        choose("u", scores, 5)


def test_diversity_skips_a_duplicate_and_coreset_spreads_over_the_features():
    # images 0 and 1 are the same frame and the most uncertain; 2 is another scene, less uncertain
    feats = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.1, 0.0]])
    scores = Scores(u=np.array([0.9, 0.9, 0.4, 0.2]), features=feats)
    assert choose("u", scores, 2) == [0, 1]  # the plain ranking takes both copies
    assert choose("u+diversity", scores, 2) == [0, 2]
    assert scores.distance[1] == 0.0 and scores.distance[2] > 0.5
    # only duplicates left: the most uncertain of them rather than nothing
    assert choose("u+diversity", scores, 4) == [0, 2, 3, 1]
    # coreset: the image nearest the mean first (3), then the farthest from it (2)
    assert choose("coreset", Scores(u=np.zeros(4), features=feats), 2) == [3, 2]


def test_typical_takes_the_densest_image_of_each_cluster_largest_first_and_no_outlier():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    sizes = (30, 20, 10)
    feats = [c + rng.normal(0.0, 0.3, (n, 3)) for c, n in zip(centres, sizes, strict=True)]
    feats = np.concatenate([*feats, [[7.0, 7.0, 0.5], [0.5, 7.0, 7.0]]])  # two outliers between clusters
    scores = Scores(u=np.zeros(len(feats)), features=feats)
    chosen = choose("typical", scores, 3)
    assert len(chosen) == 3 and max(chosen) < sum(sizes)  # neither outlier
    cluster = [int(np.argmin(np.linalg.norm(centres - feats[i], axis=1))) for i in chosen]
    assert cluster == [0, 1, 2]  # one a cluster, the largest first
    for i, j in zip(chosen, cluster, strict=True):  # each the member of its cluster nearest its mean: the densest
        start = sum(sizes[:j])
        members = feats[start : start + sizes[j]]
        assert np.linalg.norm(feats[i] - members.mean(0)) < np.median(np.linalg.norm(members - members.mean(0), axis=1))
    assert choose("typical", scores, 3) == chosen  # seeded: the same pool gives the same choice
    assert max(choose("coreset", scores, 3)) >= sum(sizes)  # k-center, by contrast, takes an outlier


def test_balanced_covers_the_predicted_classes_rare_ones_first():
    two = np.array([[1.0, 0.0, 0.0]] * 5 + [[0.0, 1.0, 0.0]] * 5)  # five frames of class 0, five of class 1
    scores = Scores(u=np.arange(10.0), classes=two)
    assert choose("balanced", scores, 2) == [0, 5]  # one of each, not two alike (U plays no part)
    rare = np.array([[0.5, 0.5, 0.0]] * 8 + [[0.45, 0.45, 0.1], [0.9, 0.1, 0.0]])  # a rare class in one frame
    assert choose("balanced", Scores(u=np.zeros(10), classes=rare), 1) == [8]
    with pytest.raises(ConfigError, match="balanced: needs the model's predicted class shares"):
        choose("balanced", Scores(u=np.zeros(10)), 1)


def test_regions_are_taken_by_score_until_the_share_of_pixels_is_reached():
    table = RegionTable()
    ids = grid_regions((8, 8), 4)  # 4 cells of 16 pixels
    assert sorted(np.unique(ids)) == [0, 1, 2, 3] and np.bincount(ids.reshape(-1)).tolist() == [16] * 4
    u = np.zeros((8, 8))
    u[:4, 4:] = 0.9  # cell 1 of image 0
    table.add(0, ids, u)
    table.add(1, ids, np.full((8, 8), 0.5))
    chosen = choose_regions(table, 10.0)  # 10 % of 128 pixels: the best cell (16 pixels) crosses the mark
    assert chosen == {0: {1}}
    assert sum(len(r) for r in choose_regions(table, 50.0).values()) == 4
    label = np.arange(64).reshape(8, 8) % 5
    mask = np.where(ids == 1, 255, 0).astype(np.uint8)
    part = partial_labels(label, mask, ignore_index=255)
    assert (part[ids == 1] == label[ids == 1]).all() and (part[ids != 1] == 255).all()


# ---------------------------------------------------------------------------------------- the command and the API


def _u_is_brightness(monkeypatch) -> None:
    """Score images as the model does (its features, its T), but with U = the image's mean grey level / 255."""
    real = advise_mod.score_image

    def scored(trainer, image, **kw):
        s = real(trainer, image, **kw)
        s.u = np.full(image.shape[:2], image.mean() / 255.0, dtype=np.float32)
        return s

    monkeypatch.setattr(advise_mod, "score_image", scored)


def _advise(*args: str) -> int:
    return main(["--no-progress", "advise", *map(str, args)])


def test_ranking_follows_the_score(models, tmp_path, monkeypatch):
    data = _dataset(tmp_path / "pool", n=4)
    _u_is_brightness(monkeypatch)  # the brightest image is the most uncertain
    assert _advise(models["source"], data, "--budget", 2, "--strategy", "u", "--out", tmp_path / "out") == 0
    rows = (tmp_path / "out" / "advice.csv").read_text().splitlines()
    assert rows[0] == "file,rank,chosen,u"  # no ACTE: no 1 - T or W column
    ranked = [r.split(",") for r in rows[1:]]
    assert [Path(r[0]).name for r in ranked] == ["img3.png", "img2.png", "img1.png", "img0.png"]
    assert [r[2] for r in ranked] == ["1", "1", "0", "0"]
    assert [float(r[3]) for r in ranked] == sorted((float(r[3]) for r in ranked), reverse=True)
    assert (tmp_path / "out" / "chosen.txt").read_text().splitlines()[1:] == ["img3", "img2"]
    assert Image.open(tmp_path / "out" / "contact_sheet.png").size[0] > 200


def test_u_plus_diversity_does_not_pick_the_same_image_twice(models, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    (tmp_path / "frames").mkdir()
    same = rng.integers(128, 255, (36, 44, 3), dtype=np.uint8)  # bright: the most uncertain, twice
    for name in ("a.png", "b.png"):
        Image.fromarray(same).save(tmp_path / "frames" / name)
    # another scene, dark, as a 16-bit PNG: read at its real range (0-25000 of 65535), not clipped to white
    Image.fromarray(rng.integers(0, 25000, (40, 31)).astype(np.uint16)).save(tmp_path / "frames" / "c.png")
    _u_is_brightness(monkeypatch)
    model = tmtseg.load(models["tmt"])
    advice = model.advise(tmp_path / "frames", tmp_path / "u", budget=2, strategy="u")
    assert advice.chosen == [0, 1]  # by U alone: both copies
    assert model.advise(tmp_path / "frames", tmp_path / "typ", budget=2).strategy == "balanced"  # the default
    advice = model.advise(tmp_path / "frames", tmp_path / "out", budget=2, strategy="u+diversity")
    assert advice.chosen == [0, 2]
    assert advice.scores.distance[1] == 0.0 and advice.scores.one_minus_t is not None
    header = (tmp_path / "out" / "advice.csv").read_text().splitlines()[0]
    assert header == "file,rank,chosen,u,one_minus_t,w,distance"
    assert not (tmp_path / "out" / "labelled.yaml").exists()  # a plain folder is no split until it is labelled
    advice = model.advise(tmp_path / "frames", tmp_path / "bal", budget=2, strategy="balanced")
    shares = advice.scores.classes  # [3, 5] from the model's predictions of the three frames
    assert shares.shape == (3, 5) and np.allclose(shares.sum(1), 1.0)
    assert advice.chosen == choose("balanced", Scores(u=np.zeros(3), classes=shares), 2)


def test_budget_above_the_pool_and_out_inside_the_input_are_refused(models, tmp_path, capsys):
    data = _dataset(tmp_path / "pool", n=2)
    ckpt = models["source"]
    assert _advise(ckpt, data, "--budget", 3, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget 3: the pool" in err and "holds 2 image(s)" in err
    assert not (tmp_path / "out").exists()
    assert _advise(ckpt, data, "--budget", 1, "--out", data / "advice") == 2
    assert "inside the input folder" in capsys.readouterr().err and not (data / "advice").exists()
    assert _advise(ckpt, data, "--budget", 1, "--strategy", "1-t", "--out", tmp_path / "o") == 2
    assert "finetune checkpoint has no ACTE" in capsys.readouterr().err
    assert _advise(ckpt, data, "--budget", 1, "--regions", 5, "--out", tmp_path / "o") == 2
    assert "one of the two" in capsys.readouterr().err
    assert _advise(ckpt, data, "--regions", 5, "--strategy", "coreset", "--out", tmp_path / "o") == 2
    assert "with --regions: choose from u, 1-t, w, random" in capsys.readouterr().err


def test_the_manifest_goes_straight_into_finetune(models, tmp_path):
    data = _dataset(tmp_path / "pool", n=4)
    out = tmp_path / "advice"
    assert _advise(models["source"], data, "--budget", 2, "--strategy", "first", "--out", out) == 0
    split = yaml.safe_load((out / "labelled.yaml").read_text())["data"]["train"]
    assert split["kind"] == "folder" and Path(split["files"]) == (out / "chosen.txt").resolve()
    target = tmp_path / "target.yaml"
    target.write_text(yaml.safe_dump({"data": {"val": {"kind": "folder", "path": str(data), "start": 3}}}))
    cfg = load_config([str(target), str(out / "labelled.yaml")], TINY)
    assert [r.name for r in build_dataset(cfg.data.train, cfg.data, train=True).records] == ["img0", "img1"]
    run = tmp_path / "ft"
    source = models["source"] / "checkpoints" / "best"
    ft = ["finetune", "-c", target, "-c", out / "labelled.yaml", "--checkpoint", source, *TINY, "train.iters=2"]
    ft += ["train.eval_every=2", "train.warmup_iters=1", f"output_dir={run}"]
    assert main(["--no-progress", *map(str, ft)]) == 0
    assert "files: " + str((out / "chosen.txt").resolve()) in (run / "config.yaml").read_text()
    assert "chosen.txt), 2 images" in (run / "README.md").read_text()  # the model card: it trained on the chosen two
    # a list naming an image the split does not hold is refused, naming it
    (tmp_path / "bad.txt").write_text("img0\nnot_there\n")
    with pytest.raises(DataError, match="not_there not in the split"):
        build_dataset(
            SplitConfig(kind="folder", path=str(data), files=str(tmp_path / "bad.txt")), cfg.data, train=False
        )


def test_region_masks_cover_the_asked_share_of_pixels(models, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text("data:\n  train: {kind: synthetic, domain: dusk, seed: 3, num_images: 3}\n")

    def shares(advice, out):
        masks = [np.asarray(Image.open(out / "masks" / f"{name}.png")) for name in advice.names]
        assert all(set(np.unique(m)) <= {0, 255} for m in masks)
        return sum(int((m > 0).sum()) for m in masks) / sum(m.size for m in masks), masks

    # the source model: a grid of token-sized cells (8 x 8 pixels), so the last cell crosses the mark by < 0.1 %
    advice = tmtseg.load(models["source"]).advise(pool, tmp_path / "grid", regions=15.0)
    share, masks = shares(advice, tmp_path / "grid")
    assert advice.strategy == "u" and 0.15 <= share < 0.151
    assert {p.stem for p in (tmp_path / "grid" / "overlays").iterdir()} == {advice.names[i] for i in advice.regions}
    assert not (tmp_path / "grid" / ".advise_regions").exists()
    # what a labeller following the masks hands back: the synthetic label inside the chosen cells, void elsewhere
    i = sorted(advice.regions)[0]
    label = build_dataset(load_config([str(pool)]).data.train, load_config([]).data, train=False).load(i)[1].numpy()
    part = partial_labels_from(tmp_path / "grid" / "masks", advice.names[i], label)
    assert ((part != 255) == (masks[i] > 0)).all() and (part[masks[i] > 0] == label[masks[i] > 0]).all()
    # the TMT model: ACTE's regions, chosen by W
    advice = tmtseg.load(models["tmt"]).advise(pool, tmp_path / "acte", regions=15.0, strategy="w")
    share, masks = shares(advice, tmp_path / "acte")
    assert share >= 0.15 and advice.scores.w is not None
