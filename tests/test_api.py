"""The Python API (issue 28 §1-3): tmtseg.load / predict / evaluate / save_pretrained / adapt on a tiny CPU run, the
model card every training run writes, the `recommended` method alias, and the README's Python example, executed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tmtseg
from tmtseg.config import load_config
from tmtseg.engine.evaluate import evaluate_checkpoint
from tmtseg.engine.restore import model_with_loss_from_checkpoint
from tmtseg.errors import DataError
from tmtseg.tools.predict import predict_array

from .test_resume import RUN, cli

REPO = Path(__file__).resolve().parents[1]
DUSK = "data:\n  train: {kind: synthetic, domain: dusk, seed: 3, num_images: 8}\n" \
       "  val: {kind: synthetic, domain: dusk, seed: 4, num_images: 2}\n"  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny source run made by `tmtseg train` (so its model card comes from the CLI's training path)."""
    out = tmp_path_factory.mktemp("api") / "day"
    # 4 steps, scored at the end (its `best`): these tests read the model, not its training; the README's example
    # adapts from it for as many steps
    short = ["train.iters=4", "train.save_every=2", "train.eval_every=4"]
    result = cli("train", *RUN, *short, f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def frame(tmp_path) -> Path:
    path = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_import_tmtseg_does_not_import_torch():
    code = "import sys, tmtseg; assert 'torch' not in sys.modules; tmtseg.load; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_training_writes_the_model_card(run):
    card = (run / "README.md").read_text()
    for part in ("library_name: tmtseg", "`vit` backbone", "32 wide", "sky, road", "8 images", "## Scores", "mIoU",
                 f"tmtseg {tmtseg.__version__}", "commit `", f'tmtseg.load("{run}")', "tmtseg predict"):  # fmt: skip
        assert part in card, part


def test_predict_is_what_tmtseg_predict_computes(run, frame):
    model = tmtseg.load(run)
    assert model.path == run / "checkpoints" / "best" and not model.trainer.training
    labels = model.predict(frame)
    probs = model.predict(frame, output="probs")
    assert labels.shape == (40, 56) and labels.dtype == np.int64
    assert probs.shape == (5, 40, 56) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert (probs.argmax(0) == labels).all()
    trainer, cfg, _ = model_with_loss_from_checkpoint(run / "checkpoints" / "best")
    image = np.array(Image.open(frame))
    cli_labels = predict_array(trainer.model.eval(), image, scale=cfg.data.scale, mode=cfg.infer.mode,
                               crop=tuple(cfg.data.crop_size), stride=tuple(cfg.infer.stride),
                               hooks=trainer.method.inference_hooks())  # fmt: skip
    assert (cli_labels == labels).all()
    # every input kind, batched: the same labels
    for same in (image, Image.open(frame), [frame, image], frame.parent):
        out = model.predict(same)
        for got in out if isinstance(out, list) else [out]:
            assert (got == labels).all()
    with pytest.raises(DataError, match="shape"):
        model.predict(np.zeros((4, 4, 5), np.uint8))


def test_evaluate_gives_the_numbers_of_tmtseg_eval(run, tmp_path):
    model = tmtseg.load(run)
    expected, _ = evaluate_checkpoint(str(run / "checkpoints" / "best"), progress=False)
    assert model.evaluate() == expected
    (tmp_path / "dusk.yaml").write_text(DUSK)
    dusk = model.evaluate(tmp_path / "dusk.yaml")
    other, _ = evaluate_checkpoint(str(run / "checkpoints" / "best"), progress=False,
                                   overrides=["data.val.domain=dusk", "data.val.seed=4"])  # fmt: skip
    assert dusk["mIoU"] == other["mIoU"]


def test_save_pretrained_round_trips_with_its_card(run, frame, tmp_path):
    model = tmtseg.load(run)
    folder = model.save_pretrained(tmp_path / "out")
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.yaml", "README.md"}
    assert f'tmtseg.load("{folder}")' in (folder / "README.md").read_text()
    again = tmtseg.load(folder)
    assert (again.predict(frame) == model.predict(frame)).all()
    assert tmtseg.load(folder / "model.safetensors").class_names == model.class_names
    with pytest.raises(DataError, match="loaded from"):
        again.save_pretrained(folder)


def test_recommended_resolves_to_lora_with_the_kl_and_says_so(capsys):
    cfg = load_config([], ["adapt.method=recommended", "adapt.preserve.weight=5"])
    assert (cfg.adapt.method, cfg.adapt.preserve.methods, cfg.adapt.preserve.weight) == ("lora", ["lora"], 5.0)
    line = capsys.readouterr().out.strip()
    assert line.startswith("recommended = lora + kl: ") and "docs/results.md §0.2" in line
    assert "+11.17" in line and "+11.17" in (REPO / "docs" / "results.md").read_text()
    assert "recommended" in cli("adapt", "--help").stdout


def _readme_python() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python", 1)[1]
    return re.search(r"```python\n(.+?)\n```", section, flags=re.S).group(1)


def test_the_readme_python_example_runs(run, frame, tmp_path, monkeypatch, capsys):
    """The README's example as written, with its paths pointing at the tiny run and a synthetic dusk config."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dusk.yaml").write_text(DUSK)
    code = _readme_python().replace('"runs/day/"', repr(str(run)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "recommended = lora + kl" in out
    card = (tmp_path / "out" / "dusk" / "README.md").read_text()
    assert "`lora`" in card and "adapt.preserve.methods=['lora']" in card and str(run) in card
    assert (tmp_path / "runs" / "dusk-recommended" / "README.md").exists()
