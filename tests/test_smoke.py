"""End to end on synthetic data with a tiny model: train, eval, predict, viz, resume, adapt, the demo."""

import csv
import json
from pathlib import Path

import yaml

from tmtseg.cli import main
from tmtseg.tools.demo import ranking

from .tiny import TINY

DATA = [
    "data.train.num_images=6",
    "data.val.num_images=2",
    "data.source.num_images=6",
    "train.log_every=2",
    "train.warmup_iters=1",
]


def test_train_eval_predict_viz_resume_adapt(tmp_path, capsys):
    run = tmp_path / "src"
    common = ["--no-progress"]
    assert main([*common, "train", *TINY, *DATA, "train.iters=3", "train.save_every=2", f"output_dir={run}"]) == 0
    assert "mIoU" in capsys.readouterr().out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["iter_0000002", "iter_0000003"]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and all(r["loss"] > 0 for r in log)
    assert (run / "config.yaml").exists() and json.loads((run / "eval.json").read_text())["step"] == 3

    ckpt = run / "checkpoints" / "iter_0000003"
    out_json = tmp_path / "eval.json"
    assert main([*common, "eval", str(ckpt), "data.val.domain=dusk", "--out", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert 0 <= scores["mIoU"] <= 100 and scores["val"]["domain"] == "dusk"
    assert set(scores["per_class_iou"]) == {"sky", "road", "building", "tree", "car"}

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    from tmtseg.config import load_config
    from tmtseg.data import build_dataset

    cfg = load_config([], DATA)
    ds = build_dataset(cfg.data.val, cfg.data, train=False)
    Image.fromarray(ds[0]["image"].permute(1, 2, 0).numpy()).save(images / "a.png")
    assert main([*common, "predict", str(ckpt), str(images), "--out", str(tmp_path / "pred")]) == 0
    pred = Image.open(tmp_path / "pred" / "a.png")
    assert pred.size == Image.open(images / "a.png").size

    assert main(["viz", str(ckpt), "--out", str(tmp_path / "viz"), "--count", "1"]) == 0
    assert (tmp_path / "viz" / "grid.png").exists()

    # resume: the run goes on from its last checkpoint to the new end, and only logs what is new
    assert (
        main([*common, "train", *TINY, *DATA, "train.iters=5", "train.save_every=2", f"output_dir={run}", "--resume"])
        == 0
    )
    log = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log == [2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000004", "iter_0000005"]  # keep_last=2
    ckpt = run / "checkpoints" / "iter_0000005"

    # adapt with TMT (and the preservation term) from the source model: the adapted checkpoint evaluates with the
    # usual command; a resume loads the frozen source model again
    ad = tmp_path / "tmt"
    adapt = [*common, "adapt", *TINY, *DATA, f"output_dir={ad}", "--method", "tmt", "--source-checkpoint",
             str(ckpt), "data.train.domain=dusk", "data.val.domain=dusk", "adapt.preserve.weight=1.0",
             "train.save_every=2"]  # fmt: skip
    assert main([*adapt, "train.iters=2"]) == 0
    assert main([*common, "eval", str(ad / "checkpoints" / "iter_0000002")]) == 0
    assert "tmt" in (ad / "config.yaml").read_text()
    assert main([*adapt, "train.iters=3", "--resume"]) == 0
    log = [json.loads(line) for line in (ad / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and all(r["loss_preserve"] >= 0 for r in log)
    assert log[-1]["loss_preserve"] > 0  # the model has moved away from the source model
    capsys.readouterr()
    assert main([*common, "train", *TINY, *DATA, "adapt.method=tmt", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "adapt.preserve.weight" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    assert main(["train", "data.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.nope" in err[0]
    assert main(["eval", str(tmp_path / "missing")]) == 3
    assert "missing" in capsys.readouterr().err
    assert main(["adapt", *TINY, "--method", "tmt"]) == 2  # no source model
    assert "source_checkpoint" in capsys.readouterr().err


def test_demo_quick_runs_the_whole_workflow(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--no-progress", "demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synthetic" in text and "docs/results.md" in text  # it says what the data are and where the real numbers are
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert sorted(line.split("|")[2].strip() for line in table) == ["finetune", "recommended", "source-only", "tmt"]
    assert "recommended > tmt ~ finetune" in text and ("the same order" in text or "it differs: " in text)
    assert (out / "pictures" / "predictions.png").stat().st_size > 0
    onnx = out / "recommended.onnx"
    assert onnx.stat().st_size > 0 and json.loads(onnx.with_suffix(".json").read_text())["method"] == "lora"
    lines = text.splitlines()
    line = lines[lines.index("7. load it in Python:") + 1].strip()
    assert line.startswith("import tmtseg; m = tmtseg.load(") and str(out / "recommended") in line
    ran = next(x for x in lines if x.strip().startswith("ran it: "))
    assert "SegmentationModel(" in ran and "method=lora" in ran and "dusk mIoU" in ran  # the line's own print
    done = lines[-1]  # where the minutes went, step by step
    assert done.startswith("done in ") and all(f"{step} " in done for step in ("source model", "advise", "ONNX"))
    # the advise step: its files, what it chose said, and the adaptations trained on exactly those images
    advice = out / "advice"
    rows = list(csv.DictReader((advice / "advice.csv").open()))
    chosen = [x for x in (advice / "chosen.txt").read_text().splitlines() if x and not x.startswith("#")]
    assert len(rows) == 4 and sorted(r["file"] for r in rows if r["chosen"] == "1") == sorted(chosen)
    assert len(chosen) == 2 and (advice / "contact_sheet.png").stat().st_size > 0
    assert any(x.startswith("2. advise: 2 of the 4 dusk images to label (" + ", ".join(chosen)) for x in lines)
    assert "3. adaptation to dusk on the 2 advised images" in text
    runs = [json.loads(x) for x in (out / "bench" / "results.jsonl").read_text().splitlines()]
    adapted = [r for r in runs if r["method"] in ("recommended", "tmt", "finetune")]
    assert len(adapted) == 3
    for r in adapted:
        cfg = yaml.safe_load((Path(r["dir"]) / "config.yaml").read_text())
        labelled = Path(cfg["data"]["train"]["files"])
        assert labelled.parent == advice and labelled.read_text() == (advice / "chosen.txt").read_text()


def test_demo_ranking_says_where_it_differs_from_the_real_benches():
    same = ranking({"source-only": 30.0, "recommended": 45.5, "tmt": 40.2, "finetune": 40.9})
    assert "Here: recommended > finetune > tmt: the same order." in same
    assert "| 1 | recommended | 45.50 | +4.60 |" in same
    other = ranking({"source-only": 30.0, "recommended": 40.5, "tmt": 43.2, "finetune": 40.9})
    assert "it differs: recommended is not above tmt (-2.70); recommended is not above finetune (-0.40)" in other
    assert "tmt is +2.30 from finetune (more than 1.0 apart)" in other
    tied = ranking(dict.fromkeys(("source-only", "recommended", "tmt", "finetune"), 2.28), quick=True)
    assert "recommended = tmt = finetune: it differs" in tied and "the numbers mean nothing" in tied
