"""predict's files a program can read (issue 31): palette id PNGs, 16-bit ids, colours, probabilities, a JSON line per
image; predict's ids equal eval's argmax at the checkpoint's precision (bf16 here), and `eval --predictions` scores
them to eval's own number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.engine.step import amp_context
from tmtseg.modeling.inference import predict_logits

from .test_adversarial import inproc, one_error
from .tiny import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A two-step bf16 run on a generated three-class folder (void pixels included): (checkpoint, data folder)."""
    root = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(0)
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    (root / "data" / "dataset.yaml").write_text("classes: [ground, square, bar]\n")
    for i in range(3):
        label = np.zeros((40, 56), dtype=np.uint8)
        label[8:24, 10:30], label[30:36, :], label[0:2, 0:4] = 1, 2, 255
        image = rng.integers(0, 80, (40, 56, 3), dtype=np.uint8) + (label[..., None] % 3 * 60).astype(np.uint8)
        Image.fromarray(image).save(root / "data" / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "data" / "masks" / f"im{i}.png")
    data = [f"data.{s}.kind=folder" for s in ("train", "val")] + [
        f"data.{s}.path={root / 'data'}" for s in ("train", "val")
    ]
    quick = ["train.iters=2", "train.warmup_iters=1", "train.save_every=2", "train.amp=bf16", "data.num_classes=3"]
    result = inproc("train", *TINY, *quick, *data, f"output_dir={root / 'run'}")
    assert result.returncode == 0, result.stderr
    return root / "run" / "checkpoints" / "iter_0000002", root / "data"


def test_predict_ids_equal_evals_argmax_and_eval_predictions_gives_evals_miou(run, tmp_path):
    ckpt, data = run
    out = tmp_path / "pred"
    result = inproc("predict", str(ckpt), str(data / "images"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "inference precision: bfloat16 autocast" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"im{i}{s}.png" for i in range(3) for s in ("", "_overlay")]
    trainer, cfg, _ = model_with_loss_from_checkpoint(ckpt)
    trainer.eval()
    from tmtseg.data import build_dataset

    ds = build_dataset(cfg.data.val, cfg.data, train=False)
    for i, record in enumerate(ds.records):
        written = Image.open(out / f"{record.image.stem}.png")
        assert written.mode == "P" and written.getpalette()[:9] == list(np.asarray(ds.palette[:3]).reshape(-1))
        item = ds[i]
        with amp_context("bf16", torch.device("cpu")):  # what the in-training evaluation computes
            logits = predict_logits(
                trainer.model,
                item["image"],
                out_size=tuple(item["label"].shape),
                hooks=trainer.method.inference_hooks(),
            )
        assert np.array_equal(np.asarray(written), logits.argmax(1)[0].numpy())
    direct, scored = tmp_path / "direct.json", tmp_path / "scored.json"
    assert inproc("eval", str(ckpt), "--out", str(direct)).returncode == 0
    result = inproc("eval", str(ckpt), "--predictions", str(out), "--out", str(scored))
    assert result.returncode == 0, result.stderr
    a, b = json.loads(direct.read_text()), json.loads(scored.read_text())
    assert (a["mIoU"], a["per_class_iou"]) == (b["mIoU"], b["per_class_iou"])


def test_formats_ids16_color_npy_and_the_json_lines(run, tmp_path):
    ckpt, data = run
    out = tmp_path / "all"
    result = inproc(
        "predict", str(ckpt), str(data / "images"), "--out", str(out), "--format", "ids16,color,npy", "--jsonl"
    )
    assert result.returncode == 0, result.stderr
    ids = np.asarray(Image.open(out / "im0.png"))
    assert Image.open(out / "im0.png").mode.startswith("I") and ids.shape == (40, 56)
    probs = np.load(out / "im0.npy")
    assert probs.shape == (3, 40, 56) and np.allclose(probs.sum(0), 1, atol=1e-3)
    assert np.array_equal(probs.argmax(0), ids)
    assert np.asarray(Image.open(out / "im0_pred.png")).shape == (40, 56, 3)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["im0", "im1", "im2"]
    assert abs(sum(lines[0]["areas"].values()) - 1) < 1e-4 and 0 < lines[0]["mean_confidence"] <= 1
    one_error(inproc("predict", str(ckpt), str(data / "images"), "--format", "palette,ids16"), 2, "--format")


def test_eval_predictions_refuses_missing_extra_and_colour_files_by_name(run, tmp_path):
    ckpt, data = run
    out = tmp_path / "p"
    assert inproc("predict", str(ckpt), str(data / "images"), "--out", str(out)).returncode == 0
    Image.fromarray(np.zeros((40, 56), dtype=np.uint8)).save(out / "stray.png")
    one_error(
        inproc("eval", str(ckpt), "--predictions", str(out), "--out", str(tmp_path / "e.json")), 2, out / "stray.png"
    )
    (out / "stray.png").unlink()
    (out / "im1.png").unlink()
    one_error(
        inproc("eval", str(ckpt), "--predictions", str(out), "--out", str(tmp_path / "e.json")), 2, out / "im1.png"
    )
    Image.fromarray(np.zeros((40, 56, 3), dtype=np.uint8)).save(out / "im1.png")
    one_error(
        inproc("eval", str(ckpt), "--predictions", str(out), "--out", str(tmp_path / "e.json")), 2, out / "im1.png"
    )


def test_predict_resizes_an_image_exactly_as_evaluation_does():
    """One resize for both paths: predict's `rescale` is eval's transform, pixel for pixel (a float resize rounded
    back to uint8 differs from torch's uint8 path in ~1 pixel value in 7: a real checkpoint's mIoU moved by 0.06)."""
    from tmtseg.data.transforms import eval_transform
    from tmtseg.tools.predict import rescale

    image = torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for scale in (0.5, 0.37, 1.0, 1.6):
        expected, _ = eval_transform(image, torch.zeros(61, 83, dtype=torch.long), scale=scale)
        assert torch.equal(rescale(image, scale), expected)


def test_a_binary_task_writes_0_255_masks_that_read_back_as_its_ids(tmp_path):
    from PIL import Image

    from tmtseg.io.pictures import default_palette, read_ids
    from tmtseg.tools.predict import Outputs, _write_one

    scores = torch.zeros(2, 6, 8)  # [K, H, W]: foreground (class 1) in the right half
    scores[0, :, :4], scores[1, :, 4:] = 1.0, 1.0
    outputs = Outputs(default_palette(2), ["background", "polyp"], formats=("palette",), binary=True)
    files = outputs.files(tmp_path, "a")
    ids = _write_one(outputs, files, np.zeros((6, 8, 3), np.uint8), scores)
    with Image.open(files["palette"]) as mask:
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) == {0, 255}
    assert np.array_equal(np.asarray(Image.open(files["palette"])) == 255, ids == 1)
    assert np.array_equal(read_ids(files["palette"]) > 0, ids == 1)  # what eval --predictions counts as foreground


def test_predict_precision_int8_and_fp32_say_so_and_stay_near_the_checkpoints_ids(run, tmp_path):
    """`predict --precision`: int8 (the ViT's linear layers quantised, tmtseg/modeling/quantize.py) and fp32 print
    their precision and write ids that agree with the checkpoint's bf16 ids on most pixels; a wrong value is refused
    by argparse (exit 2) before any image is read."""
    ckpt, data = run
    ids = {}
    for precision, line in (("checkpoint", "bfloat16 autocast"), ("fp32", "float32 (--precision fp32)"),
                            ("int8", "int8 ViT linear layers")):  # fmt: skip
        out = tmp_path / precision
        result = inproc("predict", str(ckpt), str(data / "images"), "--out", str(out), "--precision", precision)
        assert result.returncode == 0, result.stderr
        assert f"inference precision: {line}" in result.stdout
        ids[precision] = np.stack([np.asarray(Image.open(out / f"im{i}.png")) for i in range(3)])
    for precision in ("fp32", "int8"):
        assert (ids[precision] == ids["checkpoint"]).mean() >= 0.9
    assert (
        inproc(
            "predict", str(ckpt), str(data / "images"), "--out", str(tmp_path / "x"), "--precision", "int4"
        ).returncode
        == 2
    )
    assert not (tmp_path / "x").exists()
