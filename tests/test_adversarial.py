"""Adversarial inputs (issue 13), through the real command: no hang, no overwritten work, no silent wrong result, and
every bad input one line `tmtseg: error: ...` naming the file or key, with its documented exit code. Every fixture is
generated here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tmtseg.cli import main
from tmtseg.io.checkpoint import MODEL_FILE, list_checkpoints
from tmtseg.modeling.inference import _window_starts, predict_logits

from .test_resume import REPO, cli, env, logged_step, start, wait_for
from .tiny import TINY

FOLDER = ["data.train.kind=folder", "data.val.kind=folder", "data.num_classes=2"]
QUICK = [*TINY, "train.iters=2", "train.warmup_iters=1", "train.log_every=1", "train.save_every=2"]


def inproc(*args: str) -> subprocess.CompletedProcess:
    """`tmtseg --no-progress ARGS` inside this process: for errors raised before any work starts, it saves the few
    seconds of a fresh interpreter importing torch (what stdout and stderr get, and the exit code, are the same)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--no-progress", *args])
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_error(result, code: int, *named: object) -> str:
    """The run failed with `code` and exactly one stderr line, `tmtseg: error: ...`, naming each of `named`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmtseg: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for thing in named:
        assert str(thing) in lines[0], (thing, lines[0])
    return lines[0]


def make_folder(root: Path, *, n: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """A two-class folder dataset: images/, masks/ (0 = background, 1 = a bright square) and dataset.yaml."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text("classes: [background, square]\n")
    h, w = size
    for i in range(n):
        label = np.zeros((h, w), dtype=np.uint8)
        label[h // 4 : h // 2 + 2, w // 4 : w // 2 + 2] = 1
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        image[label == 1] += 150
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "masks" / f"im{i}.png")
    return root


def folder_args(path: Path) -> list[str]:
    return [*FOLDER, f"data.train.path={path}", f"data.val.path={path}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished two-step run on a generated folder: its final checkpoint folder."""
    root = tmp_path_factory.mktemp("trained")
    data = make_folder(root / "data")
    result = cli("train", *QUICK, *folder_args(data), f"output_dir={root / 'run'}")
    assert result.returncode == 0, result.stderr
    return root / "run" / "checkpoints" / "iter_0000002"


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {
        p: p.read_bytes()
        for root in paths
        for p in ([root] if root.is_file() else sorted(root.rglob("*")))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------------ 1. no hang
def test_an_image_that_turns_unreadable_mid_run_with_workers_exits_2_promptly(tmp_path):
    """Loader workers ignore SIGTERM; an error with them alive must still end the process (it used to hang at exit,
    waiting for them). Without the fix this test times out."""
    data = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = start(
        "train",
        *TINY,
        *folder_args(data),
        "data.num_workers=2",
        "train.iters=500",
        "train.log_every=1",
        "train.save_every=1000",
        f"output_dir={run}",
    )
    wait_for(lambda: logged_step(run) >= 1, proc)
    bad = data / "images" / "im1.png"
    bad.write_text("garbage\n")
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("the run hung after the data error")
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmtseg: error: {bad}: unreadable"), err


# ---------------------------------------------------------------------------------------------- 2. nothing overwritten
@pytest.mark.parametrize("target", ["model.safetensors", "train_state.safetensors", ".", "metrics.txt"])
def test_eval_out_never_replaces_the_checkpoint(checkpoint, target):
    before = snapshot(checkpoint)
    out = checkpoint / target
    one_error(inproc("eval", str(checkpoint), "--out", str(out)), 2, "--out", out)
    assert snapshot(checkpoint) == before


def test_eval_out_elsewhere_still_works(checkpoint, tmp_path):
    before = snapshot(checkpoint)
    out = tmp_path / "scores" / "eval.json"
    result = cli("eval", str(checkpoint), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "mIoU" in json.loads(out.read_text())
    assert snapshot(checkpoint) == before


def test_predict_and_viz_into_the_input_folder_never_replace_an_input(checkpoint, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("street.png", "street_pred.png"):  # the second looks like an earlier output but is an input
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    before = snapshot(folder)
    # predict into its input folder is refused whatever the names (tests/test_predict_out.py); one file is not
    one_error(inproc("predict", str(checkpoint), str(folder / "street.png"), "--out", str(folder)), 2,
              folder / "street.png")  # fmt: skip
    colour = inproc("predict", str(checkpoint), str(folder), "--out", str(folder), "--format", "color")
    one_error(colour, 2, f"--out {folder}: inside the input folder {folder}")
    one_error(inproc("viz", str(checkpoint), str(folder), "--out", str(folder)), 2, folder / "street.png")
    assert snapshot(folder) == before


def test_predict_writes_distinct_results_for_the_same_stem(checkpoint, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(folder / "a.jpg")
    result = cli("predict", str(checkpoint), str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 4 files" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "a_jpg.png",
        "a_jpg_overlay.png",
        "a_png.png",
        "a_png_overlay.png",
    ]


def test_a_config_file_inside_the_run_folder_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text("train:\n  iters: 2\n")
    one_error(inproc("train", "-c", str(config), *QUICK, f"output_dir={run_dir}"), 2, config, "output_dir")
    assert config.read_text() == "train:\n  iters: 2\n"


def test_viz_layers_out_of_range(checkpoint, tmp_path):
    one_error(inproc("viz", str(checkpoint), "--layers", "0", "7", "--out", str(tmp_path / "v")), 2, "--layers 7")
    assert not (tmp_path / "v").exists()


@pytest.mark.filterwarnings("ignore:.*train.iters changed")
def test_a_second_writer_of_a_run_folder_fails_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path):
    data, run = make_folder(tmp_path / "data"), tmp_path / "run"
    args = ["train", *TINY, *folder_args(data), "train.log_every=1", "train.save_every=1", f"output_dir={run}"]
    first = start(*args, "train.iters=400", "data.num_workers=2")
    wait_for(lambda: logged_step(run) >= 1, first)
    log_before = (run / "metrics.jsonl").read_text()
    tic = time.monotonic()
    line = one_error(inproc(*args, "train.iters=400"), 2, f"output_dir={run}", f"pid {first.pid}")
    assert "in use by another run" in line and time.monotonic() - tic < 30
    line = one_error(inproc(*args, "train.iters=400", "--resume"), 2, f"pid {first.pid}")  # resume waits its turn too
    assert (run / "metrics.jsonl").read_text().startswith(log_before)  # the first run's log was left alone
    assert first.poll() is None  # and the first run goes on
    os.kill(first.pid, signal.SIGKILL)  # the trainer only: its loader workers outlive it for a few seconds
    first.wait()  # (not communicate(): that would wait for the workers too, which hold its output pipes)
    # the lock died with the trainer, not with its last worker
    step = list_checkpoints(run)[-1]
    result = inproc(*args, f"train.iters={int(step.name.split('_')[1]) + 1}", "--resume")  # at once, in this process
    assert result.returncode == 0, result.stderr
    first.communicate()


# ------------------------------------------------------------------------------------------ 3. silent wrong results
@pytest.mark.parametrize("size,crop,stride", [(100, 32, 48), (70, 33, 100), (64, 64, 1), (31, 8, 9), (200, 50, 50)])
def test_slide_windows_cover_every_pixel_even_with_a_stride_above_the_crop(size, crop, stride):
    covered = np.zeros(size, dtype=bool)
    for start_ in _window_starts(size, crop, stride):
        covered[start_ : start_ + crop] = True
    assert covered.all()


def test_slide_inference_with_crop_below_stride_scores_every_pixel(checkpoint, tmp_path):
    from tmtseg.engine.restore import model_with_loss_from_checkpoint

    trainer, _, _ = model_with_loss_from_checkpoint(checkpoint)
    image = torch.randint(0, 255, (3, 90, 110), dtype=torch.uint8)
    scores = predict_logits(
        trainer.model.eval(), image, out_size=(90, 110), mode="slide", crop=(32, 32), stride=(48, 48)
    )
    assert bool(torch.isfinite(scores).all())
    result = cli(
        "eval",
        str(checkpoint),
        "infer.mode=slide",
        "infer.stride=[48,48]",
        "data.crop_size=[32,32]",
        "--out",
        str(tmp_path / "e.json"),
    )
    assert result.returncode == 0, result.stderr


def _sixteen_bit(path: Path) -> None:
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)  # [H, W], the full 16-bit range
    Image.fromarray(ramp).save(path)  # mode I;16


def _float_tiff(path: Path, high: float) -> None:
    Image.fromarray(np.linspace(0, high, 48 * 64).reshape(48, 64).astype(np.float32)).save(path)  # mode F


def test_16_bit_png_and_float_tiff_images_are_rescaled_from_their_real_range(tmp_path):
    from tmtseg.tools.predict import read_image

    _sixteen_bit(tmp_path / "deep.png")
    _float_tiff(tmp_path / "unit.tif", 1.0)
    _float_tiff(tmp_path / "bytes.tif", 255.0)
    for name in ("deep.png", "unit.tif", "bytes.tif"):
        rgb = read_image(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
        assert rgb.min() == 0 and rgb.max() == 255, name
        assert 0.4 < (rgb[..., 0] > 127).mean() < 0.6, name  # a ramp: half bright, not all saturated or black


def test_images_of_an_unknown_range_are_refused_by_data_check_and_training(tmp_path):
    data = make_folder(tmp_path / "data")
    _sixteen_bit(data / "images" / "im0.png")  # fine: rescaled
    _float_tiff(data / "images" / "im1.tif", 4000.0)  # floats beyond 0-255: refused, not guessed
    (data / "images" / "im1.png").unlink()
    result = cli("data", "check", str(data))
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        f"{data / 'images' / 'im1.tif'}: F image with values 0..4000: expected 16-bit integers, or floats in [0, 1] or"
        " [0, 255]; convert it to 8-bit"
    ]
    one_error(inproc("train", *QUICK, *folder_args(data), f"output_dir={tmp_path / 'run'}"), 2, "im1.tif")


def _with_weight(checkpoint: Path, dest: Path, key: str, value: float) -> Path:
    from safetensors import safe_open

    dest.mkdir()
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as f:
        meta = f.metadata()
    weights = load_file(str(checkpoint / MODEL_FILE))
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = value
    save_file(weights, str(dest / MODEL_FILE), metadata=meta)
    return dest / MODEL_FILE


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_file_and_key(checkpoint, tmp_path, value):
    key = "model.decoder.class_embed.weight"
    bad = _with_weight(checkpoint, tmp_path / "bad", key, value)
    for args in (("eval", str(bad.parent)), ("predict", str(bad), str(tmp_path), "--out", str(tmp_path / "p"))):
        line = one_error(inproc(*args), 3, bad, key)
        assert "NaN or inf" in line
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------------------- 4. sizes
def test_images_of_32_px_or_less_work_everywhere(tmp_path):
    data = make_folder(tmp_path / "data", size=(20, 32))
    assert cli("data", "check", str(data)).returncode == 0
    run = tmp_path / "run"
    result = cli("train", *QUICK, *folder_args(data), f"output_dir={run}")  # the final eval scores 20x32 images
    assert result.returncode == 0, result.stderr
    ckpt = run / "checkpoints" / "iter_0000002"
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(np.zeros((7, 5, 3), dtype=np.uint8)).save(tiny / "speck.png")
    result = inproc("predict", str(ckpt), str(tiny), "--out", str(tmp_path / "pred"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "pred" / "speck.png").size == (5, 7)
    result = inproc("viz", str(ckpt), str(tiny), "--out", str(tmp_path / "viz"))
    assert result.returncode == 0, result.stderr


def test_large_images_slide_with_a_progress_line_and_too_large_ones_are_refused_up_front(checkpoint, tmp_path):
    from tmtseg.tools.predict import MAX_PIXELS, WHOLE_MAX_PIXELS

    big, huge = tmp_path / "big", tmp_path / "huge"
    big.mkdir()
    huge.mkdir()
    Image.fromarray(np.zeros((1030, 1030, 3), dtype=np.uint8)).save(big / "wide.png")
    result = cli("predict", str(checkpoint), str(big), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"{big / 'wide.png'}: {1030 * 1030} pixels, above {WHOLE_MAX_PIXELS}: predicted by sliding" in result.stdout
    assert Image.open(tmp_path / "out" / "wide.png").size == (1030, 1030)
    side = int(MAX_PIXELS**0.5) + 1
    Image.new("L", (side, side)).save(huge / "vast.png")
    Image.new("L", (8, 8)).save(huge / "small.png")
    one_error(inproc("predict", str(checkpoint), str(huge), "--out", str(tmp_path / "out2")), 2, huge / "vast.png")
    assert not (tmp_path / "out2").exists()  # refused before anything was predicted or written


# ------------------------------------------------------------------------------------------------ 5. bad user input
def _unwritable(tmp_path: Path) -> Path:
    """An existing folder nobody may write in (root ignores permissions, but not sysfs)."""
    if os.geteuid() == 0:
        if not os.access("/sys/kernel", os.F_OK):
            pytest.skip("running as root without /sys: no unwritable folder to test with")
        return Path("/sys/kernel")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


def test_random_bytes_or_a_folder_as_config_file(tmp_path):
    config = tmp_path / "noise.yaml"
    config.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)))
    one_error(inproc("train", "-c", str(config), f"output_dir={tmp_path / 'run'}"), 2, config)
    one_error(inproc("train", "-c", str(tmp_path), f"output_dir={tmp_path / 'run'}"), 2, f"{tmp_path}: a folder")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("count", ["0", "-2"])
def test_nproc_below_one(tmp_path, count):
    result = inproc("train", *QUICK, "--nproc", count, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--nproc" in result.stderr


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.save_every=0", "train.save_every"),
        ("train.log_every=0", "train.log_every"),
        ("train.keep_last=-1", "train.keep_last"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("data.num_workers=-2", "data.num_workers"),
        ("model.dec_layers=0", "model.dec_layers"),
        ("model.num_queries=0", "model.num_queries"),
        ("model.dropout=1.5", "model.dropout"),
        ("loss.num_points=0", "loss.num_points"),
        ("infer.stride=[0,8]", "infer.stride"),
        ("model.pixel_std=[1,0,1]", "model.pixel_std"),
        ("adapt.acte.kappa=0", "adapt.acte.kappa"),
        ("train.lr=${missing}", "train.lr=${missing}"),
        ("name=!!python/object/apply:os.system ['touch pwned']", "name=!!python"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, override, named):
    run_dir = tmp_path / "run"
    one_error(inproc("train", *QUICK, override, f"output_dir={run_dir}"), 2, named)
    assert not run_dir.exists()  # validated up front: no step taken, no folder made
    assert not (REPO / "pwned").exists()


def test_dataset_yaml_with_a_syntax_error(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "dataset.yaml").write_text("classes: [background, square\nignore_index: 255\n")
    one_error(inproc("data", "check", str(data)), 2, data / "dataset.yaml")
    one_error(inproc("train", *QUICK, *folder_args(data), f"output_dir={tmp_path / 'run'}"), 2, data / "dataset.yaml")


@pytest.mark.parametrize(
    "text,named",
    [
        ("image,label,suggested_role\nimages/a.png,masks/a.png,train\n", "missing: domain"),
        ("image,label,domain,suggested_role\nimages/a.png,masks/a.png,day\n", "line 2 has 3 fields"),
        ("image,label,domain,suggested_role\nimages/a.png,masks/a.png,day,x,y\n", "line 2 has 5 fields"),
    ],
)
def test_manifest_with_a_missing_column_or_a_bad_row(tmp_path, text, named):
    folder = tmp_path / "camvid-daydusk"
    folder.mkdir()
    (folder / "manifest.csv").write_text(text)
    one_error(inproc("data", "check", str(folder)), 2, folder / "manifest.csv", named)
    split = ["data.train.kind=manifest", "data.train.dataset=camvid-daydusk", "data.train.domain=day"]
    args = ["train", *QUICK, *split, "data.num_classes=11", f"data.root={tmp_path}", f"output_dir={tmp_path / 'r'}"]
    one_error(inproc(*args), 2, folder / "manifest.csv", named)


def test_model_safetensors_that_is_a_folder(tmp_path):
    (tmp_path / "ck" / MODEL_FILE).mkdir(parents=True)
    one_error(inproc("eval", str(tmp_path / "ck")), 3, tmp_path / "ck" / MODEL_FILE)


@pytest.mark.parametrize("flag", ["--count", "--queries"])
def test_viz_counts_below_one(checkpoint, tmp_path, flag):
    result = inproc("viz", str(checkpoint), flag, "0", "--out", str(tmp_path / "v"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and flag in result.stderr
    assert not (tmp_path / "v").exists()


def test_unwritable_output_dir_and_predict_out(checkpoint, tmp_path):
    locked = _unwritable(tmp_path)
    one_error(inproc("train", *QUICK, f"output_dir={locked}"), 2, f"output_dir={locked}")
    out = locked / "predictions"
    Image.new("RGB", (40, 40)).save(tmp_path / "photo.png")
    one_error(inproc("predict", str(checkpoint), str(tmp_path), "--out", str(out)), 2, out)


# ----------------------------------------------------------------------------------------- 6. pickles as pretrained
class _Payload:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickles(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir()
    out = {}
    for name, protocol in (("p0.pth", 0), ("p2.pth", 2), ("p5.pt", 5), ("named.safetensors", 4)):
        out[name] = folder / name
        out[name].write_bytes(pickle.dumps({"pos_embed": _Payload(marker)}, protocol=protocol))
    out["tsave.bin"] = folder / "tsave.bin"
    torch.save({"model": {"w": _Payload(marker)}}, out["tsave.bin"])
    out["list.pth"] = folder / "list.pth"
    out["list.pth"].write_bytes(pickle.dumps([1, 2, 3]))
    return out


def test_pickles_as_pretrained_backbone_are_refused_as_code_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, path in _pickles(tmp_path / "pickles", marker).items():
        result = inproc("train", *QUICK, f"model.backbone.pretrained={path}", f"output_dir={tmp_path / name}")
        line = one_error(result, 3, path)
        assert "refused" in line and ("code" in line), line
        assert "weights_only" not in line and "()" not in line, line
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04garbage"])
def test_damaged_pretrained_files_name_a_reason(tmp_path, content):
    path = tmp_path / "vit.pth"
    path.write_bytes(content)
    line = one_error(
        inproc("train", *QUICK, f"model.backbone.pretrained={path}", f"output_dir={tmp_path / 'r'}"), 3, path
    )
    assert "weights_only" not in line and "()" not in line and not line.endswith("( )"), line


# ------------------------------------------------------------------------------------------------ 7. DDP, any config
@pytest.fixture(scope="module")
def ddp_source(tmp_path_factory) -> tuple[Path, list[str]]:
    """A source model whose decoder never reads one memory level (dec_layers=2, its projection a real conv)."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_folder(root / "data", n=4)
    args = [
        *TINY,
        *folder_args(data),
        "model.dec_layers=2",
        "model.hidden_dim=48",
        "data.source.kind=folder",
        f"data.source.path={data}",
        "train.iters=2",
        "train.warmup_iters=1",
        "train.log_every=1",
    ]
    result = cli("train", *args, "train.iters=1", f"output_dir={root / 'source'}")
    assert result.returncode == 0, result.stderr
    return root / "source" / "checkpoints" / "iter_0000001", args


METHODS = ("finetune", "dann", "tvt", "tmt")
DDP_WORKER = "import sys, tests.test_adversarial as t; t.adapt_every_method(sys.argv[1:])"


def adapt_every_method(argv: list[str]) -> None:
    """Each method in turn in the same two processes (under torchrun): one start-up of torch instead of four. The
    process ends as `tmtseg` ends one that joined a DDP group: all ranks leave the group in step, then exit without
    interpreter finalization (tmtseg.dist.exit_process: the group DDP wrapped outlives destroy_process_group)."""
    import traceback

    from tmtseg import dist
    from tmtseg.config import load_config
    from tmtseg.engine.loop import fit

    root, source, *args = argv
    code = 1
    try:
        for method in METHODS:
            extra = [f"adapt.method={method}", f"adapt.source_checkpoint={source}", f"output_dir={root}/{method}"]
            fit(load_config([], [*args, *extra]), init_from=source, progress=False)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        dist.cleanup(together=code == 0)
        dist.exit_process(code)


def test_every_method_trains_under_two_processes_with_a_partly_unused_decoder(ddp_source, tmp_path):
    source, args = ddp_source
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", "--no-python", sys.executable, "-c", DDP_WORKER]
    result = subprocess.run(
        [*cmd, str(tmp_path), str(source), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for method in METHODS:
        log = (tmp_path / method / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in log] == [1, 2], method


def test_frozen_parameters_are_left_to_themselves_under_ddp(tmp_path):
    """Parameters with requires_grad=False (a frozen backbone, LoRA's base weights) under DDP with static_graph: the
    step runs, they stay as they were, the others move (a one-process gloo group: the wrapper's logic is the same)."""
    import torch.distributed as tdist

    from tmtseg.adapt.build import build_model_with_loss
    from tmtseg.config import load_config
    from tmtseg.engine.optim import build_optimizer
    from tmtseg.engine.step import train_step

    cfg = load_config([], [*TINY, "model.dec_layers=2", "model.hidden_dim=48"])
    trainer = build_model_with_loss(cfg)
    trainer.model.backbone.requires_grad_(False)
    frozen = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head = trainer.model.decoder.class_embed.weight.detach().clone()
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(trainer, static_graph=True)
        optimizer = build_optimizer(cfg, trainer)
        batch = {
            "labelled": {
                "image": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8),
                "label": torch.randint(0, 5, (2, 64, 64)),
            }
        }
        for step in range(3):
            _, ok = train_step(ddp, optimizer, batch, step=step, grad_clip=1.0, amp="none", device=torch.device("cpu"))
            assert ok
    finally:
        tdist.destroy_process_group()
    for k, v in trainer.model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(trainer.model.decoder.class_embed.weight, head)
