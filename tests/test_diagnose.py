"""`tmtseg diagnose` (issue 11 §4): the measures on constructed inputs where the answer is known, TMA's attention
shift with a forced lambda, and the command end to end on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.cli import main
from tmtseg.config import load_config, load_config_over
from tmtseg.data import build_dataset
from tmtseg.engine.restore import checkpoint_meta
from tmtseg.io.checkpoint import save_checkpoint
from tmtseg.modeling.inference import predict_logits
from tmtseg.tools.diagnose import (
    Model,
    _boundary,
    _fragments,
    _regions,
    _summarise_regions,
    lambda_history,
    load_models,
    measure_view,
    to_label,
    views,
)
from tmtseg.tools.viz import boundaries

from .test_resume import cli
from .tiny import TINY

# the target split (synthetic dusk), labelled 4 and scored 2; uncertainty off, so that W = 1 - T exactly
BASE = [
    *TINY,
    "data.train.domain=dusk",
    "data.train.num_images=4",
    "data.val.domain=dusk",
    "data.val.num_images=2",
    "adapt.tma.uncertainty=false",
]


def _save(root: Path, name: str, method: str, *extra: str, steps=(2,), lambdas=None) -> Path:
    cfg = load_config([], [*BASE, f"adapt.method={method}", f"output_dir={root / name}", *extra])
    torch.manual_seed(len(name))
    trainer = build_model_with_loss(cfg, pretrained=False)
    meta = checkpoint_meta(cfg, build_dataset(cfg.data.train, cfg.data, train=False), method=method)
    for i, step in enumerate(steps):
        if lambdas is not None:
            trainer.method.tma.lambdas.data.fill_(lambdas[i])
        save_checkpoint(root / name, step=step, model=trainer, meta={**meta, "step": step})
    save_checkpoint(root / name, step=steps[-1], model=trainer, meta=meta, name="best")
    return root / name


VIT_READING = ("adapt.tma.where=vit", "adapt.tma.vit_blocks=1", "adapt.acte.cell=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run folders of a tiny source model and of tmt (lambda saved at steps 1 and 2), tvt and fine-tuning from it."""
    root = tmp_path_factory.mktemp("diagnose")
    src = _save(root, "source", "finetune")
    with_src = f"adapt.source_checkpoint={src / 'checkpoints' / 'best'}"
    return {
        "source": src,
        "tmt": _save(root, "tmt", "tmt", with_src, steps=(1, 2), lambdas=(0.25, -0.5)),
        "tvt": _save(root, "tvt", "tvt", with_src),
        "finetune": _save(root, "finetune", "finetune", with_src),
        "other_split": _save(root, "other_split", "finetune", with_src, "data.train.num_images=3"),
        "no_source": _save(root, "no_source", "tmt"),
        "tmt_vit": _save(root, "tmt_vit", "tmt", with_src, "adapt.acte.features=vit", "adapt.acte.cell=2"),
        # TMA inside the ViT's last block; W = 1 - T (BASE has U off)
        "tmt_in_vit": _save(root, "tmt_in_vit", "tmt", with_src, *VIT_READING, lambdas=(2.0,)),
    }


# ------------------------------------------------------------------------------------------- the measures themselves


def _blocks(size: int = 32, cell: int = 8) -> np.ndarray:
    """Region ids [size, size] of a grid of cell x cell blocks."""
    idx = np.arange(size) // cell
    return idx[:, None] * (size // cell) + idx[None, :]


def test_spearman_is_one_when_one_minus_t_is_the_error_and_small_regions_are_left_out():
    ids = _blocks()  # 16 regions of 64 pixels
    wrong = np.zeros(ids.shape, dtype=bool)
    rate = np.zeros(16)
    for r in range(16):
        ys, xs = np.nonzero(ids == r)
        k = (r * 7) % 16 * 4  # distinct error counts, not in region order
        wrong[ys[:k], xs[:k]] = True
        rate[r] = k / 64
    valid = np.ones(ids.shape, dtype=bool)
    valid[ids == 5] = False
    valid[np.nonzero(ids == 5)[0][0], np.nonzero(ids == 5)[1][0]] = True  # region 5 keeps 1 valid pixel: left out
    rec = _regions(ids, valid, {"source": wrong}, 1.0 - rate, min_pixels=16, low_t="median")
    assert len(rec["t"]) == 15 and rec["valid"].min() == 64
    s = _summarise_regions([rec], ("source",))
    assert s["regions"] == 15 and s["spearman"] == pytest.approx(1.0)
    # low t = high error: the error rate of the low-t half is the higher one
    assert s["error_rate_by_t"]["source"]["low_t"] > s["error_rate_by_t"]["source"]["high_t"]
    flipped = _summarise_regions([_regions(ids, valid, {"source": wrong}, rate, 16, "median")], ("source",))
    assert flipped["spearman"] == pytest.approx(-1.0)
    # a constant map has no rank correlation (not a number that looks like one)
    assert (
        _summarise_regions([_regions(ids, valid, {"source": wrong}, np.ones(16), 16, 0.5)], ("source",))["spearman"]
        is None
    )


def test_boundary_recall_is_one_for_the_label_segments_and_lower_for_a_shifted_grid():
    label = np.roll(_blocks(cell=16), (8, 8), axis=(0, 1))  # the label's segments: blocks offset by half a cell
    valid = np.ones(label.shape, dtype=bool)
    edges = boundaries(label, valid)
    exact = _boundary(label, edges, valid, (2.0,))[0]
    assert exact[0] > 0 and exact[1] == exact[0] and exact[3] == exact[2]  # recall 1, precision 1
    grid = _boundary(_blocks(cell=16), edges, valid, (2.0, 8.0))
    assert 0 < grid[0, 1] / grid[0, 0] < 0.3  # 8 px away: only near the crossings of the two grids within 2 px
    assert grid[0, 3] / grid[0, 2] < grid[0, 5] / grid[0, 4] < 1.0  # less precise than boundaries drawn at random
    assert grid[1, 1] == grid[1, 0]  # ... and all of it within 8 px
    # an edge between a class and void is no object boundary
    valid[:, :12] = False
    assert boundaries(label, valid)[:, :11].sum() == 0 and boundaries(label, valid)[:, 12:].any()


def test_a_region_split_by_the_hard_argmax_counts_as_several_pieces():
    ids = np.zeros((6, 6), dtype=np.int64)
    ids[:, 2:4] = 1  # region 0 lies left and right of region 1
    assert _fragments(ids).tolist() == [3, 2]
    assert _fragments(_blocks(size=8, cell=4)).tolist() == [4, 4]


def test_grid_maps_reach_label_resolution_by_the_cell_under_each_pixel_centre():
    grid = torch.arange(6).reshape(2, 3)  # stride-32 cells on a padded 64 x 96 input; the image is 50 x 80
    ids = to_label(grid, (64, 96), (50, 80), (100, 160))  # labels at twice the image resolution
    assert ids.shape == (100, 160)
    assert ids[63, 0] == 0 and ids[64, 0] == 3  # label row 64 has its centre at image row 32.25: the second cell row
    assert ids[0, 63] == 0 and ids[0, 64] == 1 and ids[99, 159] == 5


def test_views_follow_the_evaluation_mode():
    cfg = load_config([], [*BASE, "infer.mode=whole"])
    assert len(views((100, 130), (200, 260), cfg)) == 1
    cfg = load_config([], [*BASE, "infer.mode=slide", "data.crop_size=[64,64]"])
    tiles = views((100, 130), (200, 260), cfg)
    assert len(tiles) == 2 * 3
    covered = np.zeros((200, 260), dtype=int)
    for ys, xs, ly, lx in tiles:
        assert (ys.stop - ys.start, xs.stop - xs.start) == (64, 64) and (ly.stop - ly.start, lx.stop - lx.start) == (
            128,
            128,
        )
        covered[ly, lx] += 1
    assert covered.min() >= 1


# ------------------------------------------------------------------------------------------------ on a tiny model


def _models(runs, overrides=()) -> dict[str, Model]:
    models, _ = load_models(tmt=str(runs["tmt"]), overrides=list(overrides))
    return models


def _view(models, *overrides: str, min_valid: float = 0.25):
    cfg = load_config_over(models["tmt"].cfg, list(overrides))
    item = build_dataset(cfg.data.val, cfg.data, train=False)[0]
    rec = measure_view(
        models, item["image"], item["label"], ignore_index=255, min_valid=min_valid, low_t="median", tolerance=2.0
    )
    return rec, item


def test_every_valid_label_pixel_and_every_error_is_counted_in_exactly_one_region(runs):
    models = _models(runs)
    rec, item = _view(models, "data.scale=0.5", min_valid=0.0)  # the image at half the label's resolution
    label = item["label"].numpy()
    valid = label != 255
    assert item["image"].shape[-1] * 2 == label.shape[-1]
    for key in ("acte", "acte_grid"):
        assert rec[key]["valid"].sum() == valid.sum()
    src = models["source"].trainer
    pred = predict_logits(src.model, item["image"], out_size=label.shape).argmax(1)[0].numpy()
    assert rec["acte"]["source"].sum() == (valid & (pred != label)).sum() > 0


def test_assignment_sharpness_is_a_uniform_mix_at_kappa_near_zero_and_one_with_no_iterations(runs):
    rec, _ = _view(_models(runs, ["adapt.acte.kappa=1e-9"]))  # cos in [-1, 1]: every logit ~0
    top, pixels = rec["assignment"]
    assert 1 / 9 <= top / pixels < 1 / 5  # 1/9 inside the grid, 1/6 or 1/4 along its border
    rec, _ = _view(_models(runs, ["adapt.acte.iters=0"]))
    assert rec["assignment"][0] == rec["assignment"][1]  # L = 0: the fixed grid, every pixel in its own cell
    assert rec["fragments"]["acte"].tolist() == rec["fragments"]["grid"].tolist()


def test_tma_importance_per_region_follows_t_when_it_is_1_minus_t(runs):
    # uncertainty off (BASE) and L = 0: W(p) = 1 - t_r inside each cell, up to the resampling at cell borders
    rec, _ = _view(_models(runs, ["adapt.acte.iters=0"]), min_valid=0.5)
    assert len(rec["acte"]["t"]) > 5
    assert stats.spearmanr(rec["importance"]["t"], rec["acte"]["t"]).statistic > 0.8


@pytest.mark.parametrize("lam", [8.0, -8.0])
def test_a_forced_lambda_moves_attention_toward_or_away_from_low_t_keys(runs, lam):
    models = _models(runs)
    tma = models["tmt"].trainer.method.tma
    tma.lambdas.data.zero_()
    rec, _ = _view(models)
    for layer in rec["attention"]["tmt"]:  # lambda = 0 is vanilla attention: the same shares, no gap
        np.testing.assert_allclose(layer["gap"], 0.0)
    np.testing.assert_allclose(
        [x["share"] for x in rec["attention"]["tmt"]], [x["share"] for x in rec["attention"]["tmt_without_tma"]]
    )
    tma.lambdas.data.fill_(lam)
    rec, _ = _view(models)
    for on, off in zip(rec["attention"]["tmt"], rec["attention"]["tmt_without_tma"]):
        assert np.sign(on["share"].mean() - off["share"].mean()) == np.sign(lam)
        assert (np.sign(on["gap"]) == np.sign(lam)).all()  # low-T keys get a larger (smaller) log-weight
        np.testing.assert_allclose(on["gap"], lam * on["log_w_gap"], rtol=1e-4)  # additive: lambda * log(eps + W)


def test_lambda_history_reads_every_checkpoint_the_run_kept(runs):
    hist = lambda_history(runs["tmt"] / "checkpoints" / "best")
    assert [h["step"] for h in hist] == [1, 2]
    np.testing.assert_allclose([h["lambdas"] for h in hist], [[0.25, 0.25], [-0.5, -0.5]])


# ------------------------------------------------------------------------------------------------------- the command


def test_cli_end_to_end_writes_every_number(runs, tmp_path):
    out = tmp_path / "d.json"
    r = cli(
        "diagnose", "--tmt", str(runs["tmt"]), "--tvt", str(runs["tvt"]), "--finetune", str(runs["finetune"]),
        "--out", str(out), "infer.mode=slide", "data.crop_size=[64,64]",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "boundary recall" in r.stdout and str(out) in r.stdout
    d = json.loads(out.read_text())
    assert d["images"] == 2 and d["views"] > d["images"]  # tiles of the crop in slide mode
    assert d["checkpoints"]["source"] == str(runs["source"] / "checkpoints" / "best")  # the TMT run's source
    for key in ("acte", "acte_grid", "tvt", "uncertainty", "importance"):
        s = d["transferability_vs_source_error"][key]
        assert s["regions"] > 0 and -1.0 <= s["spearman"] <= 1.0 and 0.0 <= s["mean_t"] <= 1.0
    assert set(d["transferability_vs_source_error"]["acte"]["error_rate_by_t"]) == {"source", "finetune", "tmt"}
    layers = d["attention"]["layers"]
    assert len(layers) == 3
    for row in layers:
        assert all(0.0 <= row[k] <= 1.0 for k in ("chance", "tmt", "tmt_without_tma", "finetune"))
        assert len(row["tmt_per_head"]) == 2 and len(row["tma_log_weight_gap_per_head"]) == 2 and "log_w_gap" in row
    assert d["attention"]["lambdas"] == [-0.5, -0.5] and [h["step"] for h in d["attention"]["lambda_history"]] == [1, 2]
    assert 1 / 9 <= d["boundary_recall"]["acte_mean_top_assignment"] <= 1.0
    for key in ("acte", "grid"):
        assert 0.0 < d["boundary_recall"]["boundary_density"][key] < 1.0
        assert d["boundary_recall"]["pieces_per_region"][key] >= 1.0
        assert [x["tolerance_px"] for x in d["boundary_recall"][key]] == [2.0, 8.0]
        assert all(0.0 <= x["recall"] <= 1.0 for x in d["boundary_recall"][key])
    assert d["commit"] and d["argv"][:2] == ["--no-progress", "diagnose"]


def _error(capsys, *argv) -> tuple[int, str]:
    code = main(["--no-progress", "diagnose", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmtseg: error: "), lines
    return code, lines[0]


def test_mismatched_or_missing_checkpoints_are_one_line_errors(runs, tmp_path, capsys):
    out = ["--out", str(tmp_path / "d.json")]
    code, line = _error(capsys, "--tmt", str(runs["finetune"]), *out)
    assert code == 3 and "without ACTE" in line
    code, line = _error(capsys, "--tmt", str(runs["tmt"]), "--tvt", str(runs["tmt"]), *out)
    assert code == 3 and "--tvt needs a tvt one" in line
    code, line = _error(capsys, "--tmt", str(runs["tmt"]), "--finetune", str(runs["other_split"]), *out)
    assert code == 3 and "another target split" in line
    code, line = _error(capsys, "--tmt", str(tmp_path / "nowhere"), *out)
    assert code == 3 and "nowhere" in line
    code, line = _error(capsys, "--tmt", str(runs["no_source"]), *out)
    assert code == 2 and "--source" in line
    code, line = _error(capsys, "--tmt", str(runs["tmt"]), "--out", str(tmp_path / "d.txt"))
    assert code == 2 and "JSON" in line
    assert not (tmp_path / "d.json").exists()


def test_acte_on_the_vit_tokens_is_diagnosed_on_its_own_map(runs, tmp_path):
    out = tmp_path / "vit.json"
    r = cli("diagnose", "--tmt", str(runs["tmt_vit"]), "--finetune", str(runs["finetune"]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    for key in ("acte", "acte_grid"):  # regions and the fixed grid both of the ViT's stride-16 token map
        assert d["transferability_vs_source_error"][key]["regions"] > 0
    assert [x["tolerance_px"] for x in d["boundary_recall"]["grid"]] == [2.0, 16.0]


def test_tmt_inside_the_vit_is_diagnosed_on_its_tokens_and_its_self_attention(runs, tmp_path):
    """adapt.tma.where=vit: rho of 1 - T, U and W against the source's region error per image, and the biased block's
    attention share on low-T keys, which a positive lambda raises over the same block without the bias."""
    out = tmp_path / "v.json"
    r = cli("diagnose", "--tmt", str(runs["tmt_in_vit"]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "TMT in the ViT" in r.stdout
    d = json.loads(out.read_text())
    assert d["reading"] == "vit" and d["images"] == 2 and d["lambdas"] == [2.0, 2.0]
    for k in ("1-T", "U", "W"):
        rho = d["spearman_per_image_vs_source_error"][k]
        assert rho["mean"] is None or -1.0 <= rho["mean"] <= 1.0
    att = d["attention_share_on_low_t"]
    assert len(att["bias_on"]) == len(att["bias_off"]) == 1  # vit_blocks=1: the last block
    assert att["bias_on"][0] > att["bias_off"][0]
