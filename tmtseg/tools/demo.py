"""The built-in default job, `tmtseg demo`: the workflow a user follows, end to end, on synthetic street scenes and in
minutes. A source model on "day"; `tmtseg advise` picks, with that model, the dusk images worth labelling; the three
adaptations to "dusk" a user chooses between (`recommended`, `tmt`, `finetune`), each trained on those images; a table
that ranks them beside the ranking the real benches measured; pictures; the ONNX export of the recommended model and
the line of Python that loads it, run to prove that it does.

The training is the packaged `demo` bench (configs/bench/demo.yaml): finished runs are reused and unfinished ones
resumed, so an interrupted demo continues. The data are synthetic: the numbers show the workflow, not the methods;
docs/results.md holds the real ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tmtseg.errors import MissingExtra, TrainingError
from tmtseg.tools.bench import BenchConfig, load_bench, plan, run_bench
from tmtseg.tools.bench.results import finished_runs
from tmtseg.tools.demo_advise import DemoAdvice, advise_labels
from tmtseg.tools.demo_pictures import write_pictures

SYNTHETIC = (
    "tmtseg demo: synthetic street scenes (no download), a small ViT trained from scratch: the numbers below show the "
    "workflow, not the methods; real numbers are in docs/results.md"
)
ADAPTATIONS = ("recommended", "tmt", "finetune")  # the choice a user makes, in the order the real benches rank them
REAL_RANKING = "recommended > tmt ~ finetune"  # docs/results.md §0.1 / §0.2, DINOv2-S sources, 3 seeds
BUDGET = 12  # images of the dusk pool advise picks to label; the adaptations train on these
QUICK_BUDGET = 2
NEAR = 1.0  # mIoU: tmt and finetune closer than this count as equal here (on the real benches, within the seed spread)
# --quick: a tiny model (one ViT block, one decoder layer) for a few steps on a few images. It runs every step of the
# workflow in seconds (the test of the demo); its numbers mean nothing. Most of its time is the ONNX export, whose
# symbolic shapes cost about a third more with two blocks and three decoder layers
QUICK_RUNS = [
    "model.backbone.embed_dim=32", "model.backbone.depth=1", "model.backbone.num_heads=2", "model.conv_dim=32",
    "model.mask_dim=32", "model.hidden_dim=32", "model.nheads=2", "model.num_queries=6", "model.dec_layers=1",
    "model.dim_feedforward=64", "loss.num_points=256", "adapt.disc.hidden=32", "data.crop_size=[64,64]",
    "data.batch_size=2", "train.log_every=1",
]  # fmt: skip
QUICK_BENCH = [
    "tasks.synthetic.overrides=[model.dec_layers=1]",  # the task's own (three layers) come after QUICK_RUNS
    "tasks.synthetic.source=[train.iters=3]",
    "tasks.synthetic.adapt=[train.iters=2,train.warmup_iters=0,train.freeze_blocks=-1]",
    *(f"tasks.synthetic.domains.{d}.{s}.num_images=4" for d, s in (("day", "train"), ("day", "val"))),
    *(f"tasks.synthetic.domains.dusk.{s}.num_images=4" for s in ("adapt", "eval")),
]


@dataclass
class DemoResult:
    report: Path  # the bench's report.md
    table: str  # the ranking, and how it compares with the real benches
    pictures: list[Path]
    model: Path  # the recommended model, a folder tmtseg.load reads
    onnx: Path | None  # its ONNX export (None without the export extra)
    load_line: str  # the Python line that loads the model
    load_output: str  # what that line printed when the demo ran it
    advice: DemoAdvice | None = None  # what advise chose, the files it wrote, the list the adaptations read


def demo_bench(out: Path, *, quick: bool = False, overrides: list[str] = ()) -> tuple[BenchConfig, Path]:
    """The packaged demo bench writing into `out`. An override of a bench key (jobs, tasks.synthetic.adapt, ...) changes
    the bench; any other (model.*, train.*, ...) applies to every run; --quick adds a tiny model and short schedules."""
    overrides = [*(QUICK_RUNS + QUICK_BENCH if quick else []), *overrides]
    bench_keys = {f.name for f in fields(BenchConfig)}
    to_bench = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in bench_keys]
    to_runs = [o for o in overrides if o not in to_bench]
    bench_overrides = [f"output_dir={out / 'bench'}", *to_bench]
    if to_runs:
        bench_overrides.append(f"profiles.quick.overrides={json.dumps(to_runs)}")
    return load_bench("demo", bench_overrides)


def run_demo(out: Path, *, quick: bool = False, overrides: list[str] = (), progress: bool = True, say=print):
    """The whole workflow into `out`; `say` prints each step. Returns a DemoResult."""
    say(SYNTHETIC)
    lap = Laps()
    bench, base = demo_bench(out, quick=quick, overrides=overrides)
    say("1. source model: trained on synthetic day, scored on dusk as it is (source-only)")
    # one chain of runs (the source model, then its score on dusk): one at a time, on every core
    first = dataclasses.replace(bench, methods=["source-only"], baseline="source-only", jobs=1)
    run_bench(first, base, progress=progress, write_report=False)
    lap("source model")
    # ---- ADVISE: the source model says which dusk images to label; the adaptations train on those only ----
    budget = QUICK_BUDGET if quick else BUDGET
    advice = advise_labels(bench, _source_run(first, base), out / "advice", budget=budget)
    say(
        f"2. advise: {budget} of the {advice.pool} dusk images to label ({', '.join(advice.chosen)}), chosen by "
        f"{advice.why}\n   {advice.folder / 'advice.csv'}, {advice.folder / 'contact_sheet.png'}"
    )
    lap("advise")
    bench = _labelled(bench, advice.files)
    say(f"3. adaptation to dusk on the {budget} advised images (their labels kept, the others' dropped): "
        f"{', '.join(ADAPTATIONS)}")  # fmt: skip
    report = run_bench(bench, base, progress=progress)
    lap("adaptations")
    scores, checkpoints, eval_split = _scores(bench, base)
    table = ranking(scores, quick=quick)
    say(f"4. results on dusk (bench report: {report})\n{table}")
    pictures = write_pictures(checkpoints, out / "pictures", eval_split=eval_split)
    lap("pictures")
    say(f"5. pictures: {', '.join(map(str, pictures))}")
    model = _copy_model(Path(checkpoints["recommended"]), out / "recommended")
    onnx = _export(model, out / "recommended.onnx", say)
    lap("ONNX")
    path = json.dumps(str(model))  # quoted for Python
    line = f'import tmtseg; m = tmtseg.load({path}); print(m, "dusk mIoU", round(m.evaluate()["mIoU"], 2))'
    say(f"7. load it in Python:\n    {line}")
    printed = prove(line)
    say(f"   ran it: {printed}")
    lap("load line")
    say(f"done in {lap.total()} ({lap.parts()}; finished runs are reused when the demo is run again)")
    return DemoResult(report, table, pictures, model, onnx, line, printed, advice)


class Laps:
    """Wall-clock time per step of the demo: where its minutes go."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def total(self) -> str:
        m, s = divmod(round(time.perf_counter() - self.start), 60)
        return f"{m} min {s} s"

    def parts(self) -> str:
        return ", ".join(f"{name} {t:.0f} s" for name, t in self.laps.items())


def _source_run(bench: BenchConfig, base: Path) -> Path:
    """The source model's run folder (trained by now)."""
    return next(r.out for r in plan(bench, base).runs if r.method == "source")


def _labelled(bench: BenchConfig, files: Path) -> BenchConfig:
    """The bench with the target's labelled split (dusk `adapt`) cut to the images listed in `files`."""
    bench = copy.deepcopy(bench)
    dusk = bench.tasks["synthetic"].domains["dusk"]
    dusk.adapt = dataclasses.replace(dusk.adapt, files=str(files.resolve()))
    return bench


def _scores(bench: BenchConfig, base: Path) -> tuple[dict[str, float], dict[str, str], object]:
    """Per method: its mIoU on the scored target split and the checkpoint it was scored with (source-only: the source
    model's); and that split, for the pictures."""
    p = plan(bench, base)
    done = finished_runs(p, bench)
    runs = {r.key: r for r in p.runs}
    scores, checkpoints = {}, {}
    for _task, _pair, method, _seed, key in p.cells:
        run = runs[key]
        scores[method] = done[key]["metrics"]["mIoU"]
        checkpoints[method] = run.init if run.kind == "eval" else str(run.out / "checkpoints" / "best")
    eval_split = next(r for r in p.runs if r.method == "finetune").cfg.data.val
    return scores, checkpoints, eval_split


def ranking(scores: dict[str, float], *, quick: bool = False) -> str:
    """The methods ranked by target mIoU (Δ against fine-tuning), then one plain sentence: does this order agree with
    the real benches' (recommended above both, tmt within NEAR of fine-tuning), and where not, how it differs."""
    base = scores["finetune"]
    ranked = sorted(scores, key=lambda m: -scores[m])
    lines = ["| rank | method | mIoU on dusk | Δ vs finetune |", "|---:|---|---:|---:|"]
    lines += [f"| {i} | {m} | {scores[m]:.2f} | {scores[m] - base:+.2f} |" for i, m in enumerate(ranked, 1)]
    order = [m for m in ranked if m in ADAPTATIONS]
    here = order[0] + "".join(
        f" {'=' if round(scores[a], 2) == round(scores[b], 2) else '>'} {b}" for a, b in zip(order, order[1:])
    )
    lines.append(f"Real benches (docs/results.md §0.1, §0.2; pretrained DINOv2 sources, 3 seeds): {REAL_RANKING}.")
    differs = [
        f"recommended is not above {m} ({scores['recommended'] - scores[m]:+.2f})"
        for m in ADAPTATIONS[1:]
        if round(scores["recommended"], 2) <= round(scores[m], 2)
    ]
    gap = scores["tmt"] - base
    if abs(gap) > NEAR:
        differs.append(f"tmt is {gap:+.2f} from finetune (more than {NEAR} apart)")
    verdict = "the same order" if not differs else "it differs: " + "; ".join(differs)
    caveat = " (--quick: a tiny model for a few steps, the numbers mean nothing)" if quick else ""
    lines.append(f"Here: {here}: {verdict}. One seed of a small model on synthetic data{caveat}.")
    return "\n".join(lines)


def _copy_model(checkpoint: Path, folder: Path) -> Path:
    """The selected model in a folder of its own (what tmtseg.load and `tmtseg predict` read), not a hashed run path."""
    from tmtseg.io.checkpoint import MODEL_FILE

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint / MODEL_FILE, folder / MODEL_FILE)
    return folder


def _export(model: Path, out: Path, say) -> Path | None:
    """`tmtseg export` of the model (parity-checked with onnxruntime); without the export extra, one line says so."""
    from tmtseg.tools.export import export_checkpoint, sha256

    info = out.with_suffix(".json")
    weights = sha256(model / "model.safetensors")
    if out.exists() and info.exists() and json.loads(info.read_text()).get("checkpoint_sha256") == weights:
        say(f"6. ONNX: {out} (already exported from this model)")
        return out
    out.unlink(missing_ok=True)
    info.unlink(missing_ok=True)
    try:
        facts = export_checkpoint(model, out)
    except MissingExtra as err:
        say(f"6. ONNX export skipped: {err}")
        return None
    say(f"6. ONNX: {out} (onnxruntime matches PyTorch: max |diff| {facts['parity']['max_abs_diff']:.1e})")
    return out


def prove(line: str, timeout: float = 300) -> str:
    """Run the Python line in a fresh interpreter, as a user would paste it; the last line it printed, or
    TrainingError."""
    done = subprocess.run([sys.executable, "-c", line], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TrainingError(f"the load line failed (exit {done.returncode}): {last}")
    return (done.stdout.strip().splitlines() or [""])[-1]  # the line's own print (evaluate may print a data table)
