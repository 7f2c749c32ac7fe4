"""train.compile (issue 12 §2): the segmenter compiled for training and evaluation, with bf16 and resume; checkpoints
that load into an uncompiled model; a failing compile warns once and trains exactly as eager.

Inductor's first step of the tiny model takes ~140 s on one CPU thread, so these tests compile with
train.compile_backend=aot_eager (dynamo's graph capture and AOTAutograd's joint forward/backward graph, the parts
that can break a training loop, without inductor's code generation); the no-compiler test runs inductor up to its
compiler check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tmtseg.adapt.build import build_model_with_loss
from tmtseg.config import load_config
from tmtseg.engine.evaluate import evaluate_checkpoint
from tmtseg.engine.loop import fit
from tmtseg.io.checkpoint import MODEL_FILE, load_weights

from .tiny import TINY

# one ViT block and one decoder layer: dynamo's and AOTAutograd's tracing time grows with the layers, and nothing
# asserted here depends on their number
SMALLER = ["model.backbone.depth=1", "model.dec_layers=1"]
RUN = [
    *TINY,
    *SMALLER,
    "data.train.num_images=4",
    "data.val.num_images=2",
    "train.iters=2",
    "train.warmup_iters=1",
    "train.log_every=1",
    "train.save_every=2",
    "train.amp=bf16",
]
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]


def _run(run_dir: Path, *extra: str, resume: bool = False) -> tuple[list[dict], list[str]]:
    """Train RUN + extra in this process -> (the logged training records, the train.compile warnings)."""
    torch._dynamo.reset()
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(load_config([], [*RUN, f"output_dir={run_dir}", *extra]), resume=resume, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [str(w.message) for w in caught if "train.compile" in str(w.message)]


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("compile") / "eager"
    _run(run_dir)
    return run_dir


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "iter_0000002" / MODEL_FILE))


def test_compiled_bf16_training_matches_eager_and_its_checkpoint_loads_uncompiled(tmp_path, eager_run):
    from torch._dynamo.utils import counters

    run_dir = tmp_path / "compiled"
    records, warned = _run(run_dir, *COMPILED)
    assert not warned
    assert counters["stats"]["unique_graphs"] >= 2  # the training graph, and the evaluation's (eval mode, no_grad)
    eager_records = [json.loads(line) for line in (eager_run / "metrics.jsonl").read_text().splitlines()]
    eager_records = [r for r in eager_records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for got, expected in zip(records, eager_records, strict=True):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice"):
            assert torch.isfinite(torch.tensor(got[key]))
            assert got[key] == pytest.approx(expected[key], rel=2e-2), key  # bf16: the graph rounds otherwise
    # the checkpoint holds the segmenter's own keys and loads strictly into an uncompiled trainer
    weights = _final(run_dir)
    assert weights.keys() == _final(eager_run).keys() and not any("_orig_mod" in k for k in weights)
    trainer = build_model_with_loss(load_config([], RUN), pretrained=False)
    load_weights(trainer, weights, source="compiled run")
    trainer.eval()
    with torch.no_grad():
        out = trainer.model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert torch.isfinite(out["pred_masks"]).all()
    # the evaluation at the end ran compiled; the same checkpoint scored eagerly gives the same result
    compiled_eval = json.loads((run_dir / "eval.json").read_text())
    final = str(run_dir / "checkpoints" / "iter_0000002")
    eager_eval, _ = evaluate_checkpoint(final, overrides=["train.compile=false"], progress=False)
    assert compiled_eval["pixels"] == eager_eval["pixels"]
    assert compiled_eval["mIoU"] == pytest.approx(eager_eval["mIoU"], abs=0.5)


def test_a_failing_compile_warns_once_and_trains_exactly_as_eager(tmp_path, eager_run, monkeypatch):
    """No C compiler: inductor fails at the first call; one warning, then the run is bitwise the eager run."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # no kernel compiled earlier may be reused
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    run_dir = tmp_path / "no-compiler"
    records, warned = _run(run_dir, "train.compile=true", "train.compile_backend=inductor")
    assert len(warned) == 1 and "InvalidCxxCompiler" in warned[0] and "running eager" in warned[0]
    eager_records = [json.loads(line) for line in (eager_run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "imgs_per_s"} for r in rs]  # noqa: E731
    assert strip(records) == strip([r for r in eager_records if "loss" in r])
    got, expected = _final(run_dir), _final(eager_run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_may_switch_compile_on_and_the_bench_identity_ignores_it(tmp_path):
    from tmtseg.tools.bench import config_hash

    base = load_config([], RUN)
    assert config_hash(base) == config_hash(load_config([], [*RUN, *COMPILED]))
    run_dir = tmp_path / "run"
    _run(run_dir, "train.save_every=1", "train.iters=1")
    # not refused as a changed config: compiling changes how the segmenter executes, not what it computes
    records, warned = _run(run_dir, *COMPILED, "train.save_every=1", resume=True)
    assert not warned and [r["step"] for r in records] == [1, 2]
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()


def test_an_adversarial_method_compiles_once_not_at_every_step_of_its_ramp():
    """The GRL coefficient changes every step; it reaches the compiled segmenter as a tensor input, not as a
    constant that would recompile the graph at each step (and fall back to eager past dynamo's limit)."""
    from torch._dynamo.utils import counters

    from tmtseg.engine.compiled import compile_model

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config([], [*TINY, *SMALLER, "adapt.method=tmt", "adapt.preserve.weight=0", "train.iters=100"])
    trainer = build_model_with_loss(cfg)
    compile_model(trainer.model, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    image = lambda: torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)  # noqa: E731
    batches = {
        "labelled": {"image": image(), "label": torch.randint(0, 5, (2, 64, 64), generator=g)},
        "unlabelled": {"image": image()},
    }
    for step in range(4):
        trainer(batches, step=step)["loss"].backward()
    assert counters["stats"]["unique_graphs"] == 1
