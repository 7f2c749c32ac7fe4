"""train.nonfinite=skip keeps counting (issue 29): the count of skipped steps is in the metrics log and eval.json,
survives a resume (an older checkpoint without it reads as 0), and a run that skipped more than
train.max_skipped_frac of its steps exits 4 at its end, keeping its last checkpoint."""

from __future__ import annotations

import json
import math

from safetensors.torch import load_file, save_file

from tmtseg import cli as tmtseg_cli
from tmtseg.engine import loop
from tmtseg.io.checkpoint import STATE_FILE, list_checkpoints, load_checkpoint, read_meta

from .test_resume import cli
from .tiny import TINY

SHORT = [*TINY, "data.train.num_images=4", "data.val.num_images=2", "train.warmup_iters=2", "train.nonfinite=skip"]


def _log(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _drop_skip_count(ckpt) -> None:
    """Rewrite a checkpoint's training state as a checkpoint from before the count was kept."""
    file = ckpt / STATE_FILE
    meta = read_meta(file)
    del meta["skipped"]
    save_file(load_file(str(file)), str(file), metadata={"json": json.dumps(meta)})


def test_a_run_that_skips_too_many_steps_exits_4_keeping_its_checkpoint_and_the_count_survives_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # lr 1e30: step 1 is applied (finite, enormous weights), the loss of steps 2-6 is NaN: 5 of 6 skipped
    args = ["train", *SHORT, f"output_dir={run_dir}", "train.lr=1e30", "train.iters=6", "train.save_every=3"]
    result = cli(*args)  # the real program once: its exit code and its stderr
    last = run_dir / "checkpoints" / "iter_0000006"
    message = (
        "tmtseg: error: 5 of 6 steps were skipped as non-finite, more than train.max_skipped_frac=0.1;"
        f" last good checkpoint: {last}"
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines() == [message]
    assert list_checkpoints(run_dir)[-1] == last and load_checkpoint(last).meta["step"] == 6
    assert not (run_dir / "eval.json").exists()
    assert _log(run_dir)[-1]["skipped_steps"] == 5
    # the resumes through tmtseg.cli.main in this process: the same command without a Python start per call
    again = _main(capsys, *args, "--resume")  # the count came back from the checkpoint: the same verdict
    assert again == (4, [message])
    accepted = _main(capsys, *args, "--resume", "train.max_skipped_frac=1")  # run-neutral: a resume may raise it
    assert accepted[0] == 0, accepted
    assert json.loads((run_dir / "eval.json").read_text())["skipped_steps"] == 5
    _drop_skip_count(last)  # a checkpoint saved before the count existed reads as 0 skipped
    older = _main(capsys, *args, "--resume")
    assert older[0] == 0, older
    assert "skipped_steps" not in json.loads((run_dir / "eval.json").read_text())


def _main(capsys, *args: str) -> tuple[int, list[str]]:
    """`tmtseg --no-progress ARGS` in this process -> (exit code, the lines it wrote on stderr)."""
    capsys.readouterr()
    code = tmtseg_cli.main(["--no-progress", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_run_that_skips_few_steps_succeeds_and_says_how_many(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_step = loop.train_step

    def one_nan(*args, step, **kwargs):  # step 7 (logged as 8) has a non-finite loss, as a bad batch would give
        if step == 7:
            return {"loss": math.nan}, False
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(loop, "train_step", one_nan)
    argv = ["--no-progress", "train", *SHORT, f"output_dir={run_dir}", "train.iters=20", "train.save_every=10",
            "train.log_every=5", "train.max_skipped_frac=0.1"]  # fmt: skip
    assert tmtseg_cli.main(argv) == 0
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["step"] == 20
    log = _log(run_dir)
    assert [r["step"] for r in log if "skipped" in r] == [8]
    assert log[-1]["step"] == 20 and log[-1]["skipped_steps"] == 1


def test_max_skipped_frac_leaves_a_runs_identity_alone():
    from tmtseg.config import load_config
    from tmtseg.tools.bench import config_hash

    assert config_hash(load_config([], ["train.max_skipped_frac=0.5"])) == config_hash(load_config([], []))
