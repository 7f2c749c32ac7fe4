"""tmtseg bench: planning, skipping finished runs, resuming, reports and their arithmetic."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.tiny import TINY
from tmtseg.errors import ConfigError
from tmtseg.tools.bench import load_bench, plan, read_sessions, run_bench
from tmtseg.tools.bench.tables import build_table, markdown, method_colors, wins


def _bench_file(tmp_path: Path, **changes) -> Path:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / "out"),
        "methods": ["source-only", "finetune", "tmt", "target-only"],
        "threads": 1,  # one torch thread per run: pytest-xdist's workers share the cores (not part of a run's hash)
        "profiles": {"quick": {"seeds": [0], "overrides": [*TINY, "train.log_every=1"]}},
        "tasks": {
            "synthetic": {
                "config": "demo.yaml",
                "source": ["train.iters=3"],
                "adapt": ["train.iters=2", "train.warmup_iters=0"],
                "domains": {
                    "day": {
                        "train": {"kind": "synthetic", "domain": "day", "seed": 0, "num_images": 4},
                        "val": {"kind": "synthetic", "domain": "day", "seed": 1, "num_images": 2},
                    },
                    "dusk": {
                        "train": {"kind": "synthetic", "domain": "dusk", "seed": 4, "num_images": 4},
                        "adapt": {"kind": "synthetic", "domain": "dusk", "seed": 2, "num_images": 4},
                        "eval": {"kind": "synthetic", "domain": "dusk", "seed": 3, "num_images": 2},
                    },
                },
                "core_pairs": ["day->dusk"],
            }
        },
    }
    cfg.update(changes)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _bar_state(line: str) -> tuple[str, str]:
    """A bar line's count and note: "tiny:  33%|###3 | 10/30 [00:43<01:27, 4.40s/step, a 1/2]" -> ("10/30", "a 1/2")."""
    count = line.split("|")[-1].split("[")[0].strip()
    return count, ", ".join(line.rsplit("[", 1)[1].rstrip("]").split(", ")[2:])


def test_plan_core_and_all_pairs_share_sources_and_target_only(tmp_path):
    bench, base = load_bench(str(_bench_file(tmp_path)))
    p = plan(bench, base)
    keys = [r.key for r in p.runs]
    assert keys == [
        "synthetic/day/source/seed0",
        "synthetic/day->dusk/source-only/seed0",
        "synthetic/day->dusk/finetune/seed0",
        "synthetic/day->dusk/tmt/seed0",
        "synthetic/dusk/target-only/seed0",
    ]
    by_key = {r.key: r for r in p.runs}
    src = by_key["synthetic/day/source/seed0"]
    ft = by_key["synthetic/day->dusk/finetune/seed0"]
    assert ft.after == src.key and ft.init == str(src.out / "checkpoints" / "best")
    assert ft.cfg.data.train.seed == 2 and ft.cfg.data.val.seed == 3  # the target's adapt / eval splits
    assert ft.cfg.data.source == src.cfg.data.train  # the unlabelled source images are the source's training split
    assert by_key["synthetic/day->dusk/tmt/seed0"].cfg.adapt.method == "tmt"
    assert src.cfg.train.eval_every == src.cfg.train.iters  # a source is always scored, so `best` exists

    # a profile's schedules are written out as overrides after each task's own, and nothing else is rescaled
    changes = ["profiles.quick.source=[train.iters=5]", "profiles.quick.adapt=[train.iters=1]"]
    by_key = {r.key: r for r in plan(*load_bench(str(_bench_file(tmp_path)), changes)).runs}
    assert by_key["synthetic/day/source/seed0"].cfg.train.iters == 5
    assert by_key["synthetic/day->dusk/tmt/seed0"].cfg.train.iters == 1
    assert by_key["synthetic/dusk/target-only/seed0"].cfg.train.iters == 5  # the source schedule, from scratch
    assert by_key["synthetic/day/source/seed0"].cfg.train.warmup_iters == src.cfg.train.warmup_iters

    bench, base = load_bench(str(_bench_file(tmp_path)), ["profiles.quick.pairs=all"])
    # day has no adapt/eval split, so dusk->day is refused naming the key
    with pytest.raises(ConfigError, match=r"tasks\.synthetic\.domains\.day\.adapt"):
        plan(bench, base)


def test_bench_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        load_bench(str(_bench_file(tmp_path)), ["bogus=1"])
    with pytest.raises(ConfigError, match="methods: 'nope'"):
        load_bench(str(_bench_file(tmp_path, methods=["finetune", "nope"])))
    with pytest.raises(ConfigError, match="profile='huge'"):
        load_bench(str(_bench_file(tmp_path)), ["profile=huge"])
    with pytest.raises(ConfigError, match="not found"):
        load_bench(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="keep='all'"):
        load_bench(str(_bench_file(tmp_path)), ["keep=all"])


def test_run_report_skip_extend_and_resume(tmp_path, capsys):
    bench, base = load_bench(str(_bench_file(tmp_path)))
    start = time.monotonic()
    report = run_bench(bench, base, progress=True)
    elapsed = time.monotonic() - start
    # stderr is not a terminal here (a log file): the bar is a line when a run ends or a minute has passed, not at
    # every 5-s poll of the runs, and each state once (tqdm wrote the first and the last twice, joined by \r)
    err = capsys.readouterr().err
    draws = [line for line in err.splitlines() if line.startswith("tiny:")]
    assert "\r" not in err and len(draws) == len({_bar_state(d) for d in draws}), draws
    assert len(draws) <= 5 + 1 + int(elapsed // 60) and draws[-1].startswith("tiny: 100%"), (draws, elapsed)
    out = Path(bench.output_dir)
    records = _lines(out / "results.jsonl")
    assert sorted(r["method"] for r in records) == ["finetune", "source", "source-only", "target-only", "tmt"]
    for r in records:
        assert 0.0 <= r["metrics"]["mIoU"] <= 100.0 and r["peak_rss_mib"] > 0 and r["wall_s"] > 0
        assert r["commit"] is not None and "cores" in r["machine"]
    assert all(r["imgs_per_s"] > 0 for r in records if r["kind"] == "train")
    text = report.read_text()
    for m in ("source-only", "finetune", "tmt", "target-only"):
        assert f"| {m} |" in text
    assert (out / "runs.csv").read_text().count("\n") == 1 + 5
    assert (out / "pairs.png").stat().st_size > 0 and (out / "delta.png").stat().st_size > 0
    # the invocation's machine time: a line per finished run, the report sums each invocation's last
    session = _lines(out / "sessions.jsonl")
    assert [s["runs"] for s in session] == [1, 2, 3, 4, 5] and len({s["start"] for s in session}) == 1
    assert session[-1]["elapsed_s"] >= max(r["wall_s"] for r in records) and session[-1]["jobs"] == bench.jobs
    assert f"{session[-1]['elapsed_s'] / 3600:.2f} h over 1 invocation(s) (5 runs finished" in text
    # a recorded run keeps its selected model, without the training state only step checkpoints are resumed from
    for r in records:
        if r["kind"] == "train":
            ckpts = Path(r["dir"]) / "checkpoints"
            assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("best")) == [], r["key"]
            assert sorted(p.name for p in (ckpts / "best").iterdir()) == ["model.safetensors"], r["key"]

    # the same config again: nothing runs, nothing is appended
    run_bench(bench, base, progress=False)
    assert len(_lines(out / "results.jsonl")) == 5 and len(_lines(out / "sessions.jsonl")) == 5

    # a new method and a variant: only they run; the source model is reused
    variants = {"tmt-patches": {"method": "tmt", "overrides": ["adapt.acte.iters=0"]}}
    bench, base = load_bench(str(_bench_file(tmp_path, methods=["finetune", "dann", "tmt-patches"], variants=variants)))
    run_bench(bench, base, progress=False)
    new = _lines(out / "results.jsonl")[5:]
    assert sorted(r["method"] for r in new) == ["dann", "tmt-patches"]
    with open(out / "sessions.jsonl", "a") as f:
        f.write('{"start": "cut by a kill", "elapsed')  # a line cut by a kill is skipped
    sessions = read_sessions(out / "sessions.jsonl")
    assert [s["runs"] for s in sessions] == [5, 2]
    assert "over 2 invocation(s) (7 runs finished" in (out / "report.md").read_text()

    # a run killed after its training but before it was recorded: its folder is resumed, not started again
    lines = (out / "results.jsonl").read_text().splitlines()
    dann = json.loads(lines[-2] if json.loads(lines[-2])["method"] == "dann" else lines[-1])
    (out / "results.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["method"] != "dann") + "\n")
    before = (Path(dann["dir"]) / "metrics.jsonl").read_text()
    run_bench(bench, base, progress=False)
    again = [r for r in _lines(out / "results.jsonl") if r["method"] == "dann"]
    assert len(again) == 1 and again[0]["metrics"]["mIoU"] == dann["metrics"]["mIoU"]
    assert (Path(dann["dir"]) / "metrics.jsonl").read_text() == before  # no step was trained again
    assert [s["runs"] for s in read_sessions(out / "sessions.jsonl")] == [5, 2, 1]  # after the cut line, a new one


def test_the_bench_bar_writes_each_update_once_into_a_log_file(tmp_path, monkeypatch):
    """`tmtseg bench ... > bench.log 2>&1`: a line per new state (a run ended, or a minute passed), none twice; the
    close writes the last state only if it is not in the log yet."""
    from tmtseg.tools.bench.progress import BenchProgress

    log, now = tmp_path / "bench.log", [0.0]
    with open(log, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        bar = BenchProgress(30, "tiny", enabled=True, clock=lambda: now[0])
        bar.update(0, "a 0/2")  # the first poll
        now[0] = 5.0
        bar.update(0, "a 1/2")  # the next poll, within the minute: no line
        bar.update(10, "", force=True)  # a run ended
        bar.update(10, "", force=True)  # and nothing since: no line
        now[0] = 70.0
        bar.update(10, "b 1/2")  # a minute on
        now[0] = 75.0
        bar.update(20, "b 2/2")
        bar.update(30, "", force=True)  # the last run ended
        bar.close()  # the last state is in the log already
        other = BenchProgress(30, "tiny", enabled=True, clock=lambda: now[0])
        other.update(5, "c 5/9")
        other.update(6, "c 6/9")  # within the minute: no line, until the close
        other.close()
        BenchProgress(30, "tiny", enabled=False).update(1, "quiet", force=True)  # --no-progress: nothing
    lines = log.read_text().splitlines()
    assert [_bar_state(x) for x in lines] == [("0/30", "a 0/2"), ("10/30", ""), ("10/30", "b 1/2"), ("30/30", ""),
                                              ("5/30", "c 5/9"), ("6/30", "c 6/9")], lines  # fmt: skip
    assert all(x.startswith("tiny: ") for x in lines) and "\r" not in log.read_text()


def test_report_wins_and_deltas_follow_the_seed_spread():
    cells, done = [], {}
    scores = {  # pair -> method -> per-seed mIoU
        "a->b": {"finetune": [50, 52, 54], "tmt": [55, 57, 59], "dann": [49, 53, 57]},
        "c->d": {"finetune": [40, 40, 40], "tmt": [40.5, 39.0, 42.0], "dann": [30, 31, 32]},
    }
    for pair, by_method in scores.items():
        for method, vals in by_method.items():
            for seed, v in enumerate(vals):
                key = f"t/{pair}/{method}/seed{seed}"
                cells.append(("t", pair, method, seed, key))
                done[key] = {"metrics": {"mIoU": float(v)}, "method": method}
    table = build_table(cells, done)
    np.testing.assert_allclose(table.delta("t: a->b", "tmt", "finetune"), [5, 5, 5])
    # tmt: +5 with no spread on a->b (a win); +0.5 mean with std 1.5 on c->d (not a win)
    assert wins(table, "tmt", "finetune") == (1, 1)
    # dann: +1 ± 2 on a->b is inside the spread; -10 on c->d
    assert wins(table, "dann", "finetune") == (0, 0)
    text = markdown(table, list(done.values()), baseline="finetune", title="t")
    assert "| tmt | 57.00 ± 2.00 | 40.50 ± 1.50 | 48.75 ± 1.52 | +2.75 ± 0.75 | 1/2 | 1/2 |" in text


def test_extends_reuse_and_the_versioned_hash(tmp_path, monkeypatch):
    from tmtseg.tools.bench import config_hash, describe, identity

    base = _bench_file(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": str(base),
                "name": "child",
                "output_dir": str(tmp_path / "child"),
                "source_dir": str(tmp_path / "out" / "sources"),
                "reuse": [str(tmp_path / "out")],
                "methods": ["finetune", "tmt-beta"],
                "variants": {"tmt-beta": {"method": "tmt", "overrides": ["adapt.tma.loss_weight=1.0"]}},
            }
        )
    )
    bench, b = load_bench(str(child))
    assert bench.tasks["synthetic"].source == ["train.iters=3"]  # from the base
    runs = {r.key: r for r in plan(bench, b).runs}
    assert set(runs) == {"synthetic/day/source/seed0", "synthetic/day->dusk/finetune/seed0",
                         "synthetic/day->dusk/tmt-beta/seed0"}  # fmt: skip
    # the base bench recorded its source and finetune runs: the child counts them as done
    parent, pb = load_bench(str(base))
    parent_runs = {r.key: r for r in plan(parent, pb).runs}
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "results.jsonl", "w") as f:
        for key in ("synthetic/day/source/seed0", "synthetic/day->dusk/finetune/seed0"):
            assert parent_runs[key].out.name == runs[key].out.name  # same config, same hash
            f.write(json.dumps({"key": key, "hash": runs[key].out.name, "metrics": {"mIoU": 1.0}}) + "\n")
    states = {line.split()[1]: line.split()[0] for line in describe(bench, b).splitlines()[:-1]}
    assert states == {"synthetic/day/source/seed0": "done", "synthetic/day->dusk/finetune/seed0": "done",
                      "synthetic/day->dusk/tmt-beta/seed0": "todo"}  # fmt: skip
    # a run's identity: every key of its resolved config, and the hash version (bumped when the code changes what a
    # config computes)
    cfg = runs["synthetic/day->dusk/finetune/seed0"].cfg
    name = runs["synthetic/day->dusk/finetune/seed0"].out.name
    assert config_hash(cfg) == name
    cfg.train.lr *= 2
    assert config_hash(cfg) != name
    cfg.train.lr /= 2
    monkeypatch.setattr(identity, "HASH_VERSION", identity.HASH_VERSION + 1)  # where config_hash reads it
    assert config_hash(cfg) != name

    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("extends: cyclic.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_bench(str(cyclic))


def test_only_restricts_the_plan_to_tasks_or_pairs(tmp_path):
    bench, base = load_bench(str(_bench_file(tmp_path)), ["only=[synthetic/day->dusk]"])
    assert len(plan(bench, base).runs) == 5
    bench, base = load_bench(str(_bench_file(tmp_path)), ["only=[other]"])
    assert plan(bench, base).runs == []


def test_a_run_is_found_under_another_method_name_and_preserve_hashes_only_where_it_acts(tmp_path):
    from tmtseg.tools.bench import config_hash, describe, report

    variants = {"tmt-p10": {"method": "tmt", "overrides": ["adapt.preserve.weight=10.0"]},
                "tmt-paper": {"method": "tmt", "overrides": ["adapt.preserve.weight=0.0"]}}  # fmt: skip
    base = _bench_file(tmp_path, methods=["finetune", "tmt", "tmt-p10", "tmt-paper"], variants=variants)
    bench, b = load_bench(str(base))
    runs = {r.key: r for r in plan(bench, b).runs}
    h = {k.split("/")[2]: r.out.name for k, r in runs.items() if "->" in k}
    assert h["tmt"] == h["tmt-p10"]  # the default weight is 10: the same run under two names
    assert h["tmt-paper"] not in (h["tmt"], h["finetune"])
    # finetune does not use the term: listing it elsewhere, or its weight, does not move finetune's hash
    cfg = runs["synthetic/day->dusk/finetune/seed0"].cfg
    cfg.adapt.preserve.weight = 3.0
    assert config_hash(cfg) == h["finetune"]
    cfg.adapt.preserve.methods = ["finetune"]
    assert config_hash(cfg) != h["finetune"]
    # a run recorded as tmt-p10 (by an earlier bench) counts as done for tmt, relabelled
    (tmp_path / "old").mkdir()
    rec = {"key": "synthetic/day->dusk/tmt-p10/seed0", "method": "tmt-p10", "hash": h["tmt"], "metrics": {"mIoU": 7.0},
           "task": "synthetic", "pair": "day->dusk", "seed": 0}  # fmt: skip
    (tmp_path / "old" / "results.jsonl").write_text(json.dumps(rec) + "\n")
    bench.reuse = [str(tmp_path / "old")]
    bench.output_dir = str(tmp_path / "fresh")  # --report-only into a folder that does not exist yet
    bench.source_dir = str(tmp_path / "out" / "sources")  # the same source models, so the same hashes
    states = {line.split()[1]: line.split()[0] for line in describe(bench, b).splitlines()[:-1]}
    assert states["synthetic/day->dusk/tmt/seed0"] == "done" and states["synthetic/day->dusk/tmt-p10/seed0"] == "done"
    assert states["synthetic/day->dusk/tmt-paper/seed0"] == "todo"
    report(bench, b)
    table = (tmp_path / "fresh" / "report.md").read_text()
    assert "| tmt | " in table and "| tmt-p10 | " in table


def test_a_regulariser_or_lora_enters_the_hash_only_where_it_acts():
    """The sections a method does not use leave its hash alone; a method that is another plus a regulariser (lwf =
    finetune + KL, l2sp = finetune + L2-SP) hashes as that one, so the same computation is found under either name."""
    from tmtseg.config import load_config
    from tmtseg.tools.bench import config_hash

    def h(*overrides: str) -> str:
        return config_hash(load_config([], list(overrides)))

    finetune, tmt = h("adapt.method=finetune"), h("adapt.method=tmt")
    unused = ["adapt.l2sp.alpha=1.0", "adapt.lora.rank=2", "adapt.l2sp.methods=[dann]", "adapt.preserve.methods=[]"]
    assert h("adapt.method=finetune", *unused) == finetune
    assert h("adapt.method=tmt", "adapt.l2sp.methods=[tmt]") != tmt
    assert h("adapt.method=lwf") == h("adapt.method=finetune", "adapt.preserve.methods=[finetune]") != finetune
    l2sp = h("adapt.method=l2sp")
    assert l2sp == h("adapt.method=finetune", "adapt.l2sp.methods=[finetune]")
    assert len({l2sp, h("adapt.method=lora"), finetune}) == 3
    # a piece's section counts only where a method has the piece
    for key in ("adapt.tma.loss_weight=1.0", "adapt.acte.cell=2", "adapt.disc.hidden=8", "adapt.tvt.eps=0.1"):
        assert h("adapt.method=finetune", key) == finetune
    assert h("adapt.method=tmt", "adapt.tma.loss_weight=1.0") != tmt != h("adapt.method=tmt", "adapt.acte.cell=2")
    assert (
        h("adapt.method=dann", "adapt.disc.hidden=8")
        != h("adapt.method=dann")
        == h("adapt.method=dann", "adapt.acte.cell=2")
    )
    assert h("adapt.method=tvt", "adapt.tvt.eps=0.1") != h("adapt.method=tvt")
    # LoRA given to a method: finetune + LoRA is lora; TMT + LoRA is its own run
    assert h("adapt.method=finetune", "adapt.lora.methods=[finetune]") == h("adapt.method=lora")
    assert (
        h("adapt.method=tmt", "adapt.lora.methods=[tmt]") != tmt == h("adapt.method=tmt", "adapt.lora.methods=[dann]")
    )


def test_keys_that_only_say_how_a_run_is_carried_out_leave_its_identity_alone():
    from tmtseg.config import RUN_NEUTRAL, load_config
    from tmtseg.tools.bench import config_hash

    def h(*overrides: str) -> str:
        return config_hash(load_config([], list(overrides)))

    base = h()
    assert h("train.save_every=7", "train.log_every=3", "data.num_workers=3", "output_dir=x") == base
    assert h("infer.feature_cache=cache") == base
    assert h("infer.stride=[50,50]") != base and h("train.eval_every=5") != base  # these change what is computed
    assert {"train.iters", "infer.mode"}.isdisjoint(RUN_NEUTRAL)


def test_every_method_of_a_core_sized_bench_has_its_own_colour():
    for n in (4, 10, 16, 20):
        colours = method_colors([f"m{i}" for i in range(n)])
        assert len(set(colours.values())) == n


def test_keep_sources_drops_every_other_runs_checkpoints(tmp_path):
    bench, base = load_bench(str(_bench_file(tmp_path, methods=["source-only", "finetune"])), ["keep=sources"])
    run_bench(bench, base, progress=False)
    records = {r["method"]: r for r in _lines(Path(bench.output_dir) / "results.jsonl")}
    assert sorted(records) == ["finetune", "source", "source-only"]
    assert (Path(records["source"]["dir"]) / "checkpoints" / "best" / "model.safetensors").is_file()
    tuned = Path(records["finetune"]["dir"])
    assert not (tuned / "checkpoints").exists() and (tuned / "eval.json").is_file()
    assert 0.0 <= records["finetune"]["metrics"]["mIoU"] <= 100.0
