"""The cross-domain benchmark (benchmark.md): every pair, every method, every seed, from one YAML file.

A bench config names the data root, each task's base config and its domains with their splits written as data, the
pairs, the methods (and named variants for ablations), the seeds and a profile. `plan` turns it into runs: one source
model per (task, source domain, seed), then per (pair, method, seed) an adaptation, a source-only evaluation or a
target-only training. Each run lives in a folder named by a hash of its resolved config and is recorded in
``results.jsonl`` when it finishes: re-running the same config skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tmtseg import config as config_mod
from tmtseg.adapt.method import PIECE_SECTIONS, piece_sections
from tmtseg.adapt.recipes import METHODS, regularisers_of, tuning_of
from tmtseg.config import Config, SplitConfig
from tmtseg.errors import ConfigError, TmtsegError

PACKAGED = Path(__file__).resolve().parents[2] / "configs"  # tmtseg/configs
ADAPT_METHODS = tuple(METHODS)
REFERENCE_METHODS = ("source-only", "target-only")


# ----------------------------------------------------------------------------------------------------------- config
@dataclass
class DomainSplits:
    """A domain's splits: `train` / `val` when it is a source (training, model selection); `adapt` / `eval` when it is
    a target (the labelled target split, the scored split). A split a pair needs and the domain lacks is an error."""

    train: SplitConfig | None = None
    val: SplitConfig | None = None
    adapt: SplitConfig | None = None
    eval: SplitConfig | None = None


@dataclass
class TaskSpec:
    config: str = ""  # the task's base config (model, data sizes): a path, or a name in the packaged configs/
    overrides: list[str] = field(default_factory=list)  # every run of the task
    source: list[str] = field(default_factory=list)  # source training: its schedule
    adapt: list[str] = field(default_factory=list)  # every adaptation method: one shared schedule
    target_only: list[str] = field(default_factory=list)  # training from scratch on the target split
    domains: dict[str, DomainSplits] = field(default_factory=dict)
    core_pairs: list[str] = field(default_factory=list)  # "source->target"


@dataclass
class Variant:
    """A named method for ablations: an adaptation method plus config overrides."""

    method: str = "tmt"
    overrides: list[str] = field(default_factory=list)


@dataclass
class Profile:
    seeds: list[int] = field(default_factory=lambda: [0])
    pairs: str = "core"  # core | all (every ordered pair of domains within a task)
    overrides: list[str] = field(default_factory=list)  # every run of the profile
    # schedule overrides after each task's own (a quick profile runs shorter), written out as config keys
    source: list[str] = field(default_factory=list)
    adapt: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)


@dataclass
class BenchConfig:
    name: str = "bench"
    output_dir: str = "runs/bench"  # results, report, plots, and the runs' folders
    source_dir: str = ""  # where source models live ("" = <output_dir>/sources): share them between bench configs
    reuse: list[str] = field(default_factory=list)  # other benches' output_dirs: their finished runs count as done
    data_root: str = ""  # "" = ../shared/data
    profile: str = "quick"
    profiles: dict[str, Profile] = field(
        default_factory=lambda: {"quick": Profile(seeds=[0]), "full": Profile(seeds=[0, 1, 2])}
    )
    methods: list[str] = field(default_factory=lambda: [*REFERENCE_METHODS[:1], *ADAPT_METHODS, "target-only"])
    baseline: str = "finetune"  # the method every delta is taken against
    variants: dict[str, Variant] = field(default_factory=dict)
    only: list[str] = field(default_factory=list)  # restrict to tasks or pairs: "camvid", "polyp/kvasir->colondb"
    jobs: int = 1  # runs in parallel (each in its own process)
    threads: int = 0  # torch threads per run; 0 = cores / jobs
    # the frozen ViT's outputs on the scored images, kept in <output_dir>/cache between runs (infer.feature_cache):
    # every method whose ViT stays frozen, and every seed, scores the same windows through the same ViT
    feature_cache: bool = True
    # what a recorded run keeps on disk: "best" (its selected model, ~100 MB with DINOv2-S: pictures, export) or
    # "sources" (only the source models, which later runs start from; the others keep their scores and logs). The
    # full driving bench keeps 20 GB with "best", 1 GB with "sources"
    keep: str = "best"
    tasks: dict[str, TaskSpec] = field(default_factory=dict)


def _resolve_file(name: str, *dirs: Path) -> Path:
    """A config file: the path itself, or `name` (with or without .yaml) in one of `dirs`."""
    for candidate in (Path(name), *(d / n for d in dirs for n in (name, f"{name}.yaml"))):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: config file not found (looked in {', '.join(str(d) for d in dirs)})")


def _read_layers(file: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The YAML of `file` after that of the bench it `extends` (a path beside it or a packaged name), if any."""
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a bench config must hold a mapping of keys")
    base = data.pop("extends", None)
    if base is None:
        return [data]
    parent = _resolve_file(str(base), file.parent, PACKAGED / "bench")
    if parent.resolve() in seen:
        raise ConfigError(f"{file}: bench key extends={base!r}: a cycle")
    return [*_read_layers(parent, (*seen, file.resolve())), data]


def load_bench(path: str, overrides: list[str] = ()) -> tuple[BenchConfig, Path]:
    """Read a bench YAML (a path or a packaged name such as ``core``) over the defaults; unknown keys are errors."""
    file = _resolve_file(path, Path.cwd(), PACKAGED / "bench")
    layers = _read_layers(file)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), *layers)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: not a valid value ({str(err).splitlines()[0]})") from None
        bench: BenchConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{file}: bench key {key}: {str(err).splitlines()[0]}") from None
    if bench.profile not in bench.profiles:
        raise ConfigError(f"{file}: bench key profile={bench.profile!r}: not one of {', '.join(bench.profiles)}")
    known = {*ADAPT_METHODS, *REFERENCE_METHODS, *bench.variants}
    for m in bench.methods:
        if m not in known:
            raise ConfigError(f"{file}: bench key methods: {m!r} is not a method or a variant ({', '.join(known)})")
    for name, v in bench.variants.items():
        if v.method not in ADAPT_METHODS:
            raise ConfigError(f"{file}: bench key variants.{name}.method={v.method!r}: one of {ADAPT_METHODS}")
    if bench.baseline not in bench.methods:
        raise ConfigError(f"{file}: bench key baseline={bench.baseline!r}: not among the methods")
    if bench.jobs < 1:
        raise ConfigError(f"{file}: bench key jobs={bench.jobs}: must be >= 1")
    if bench.keep not in ("best", "sources"):
        raise ConfigError(f"{file}: bench key keep={bench.keep!r}: best or sources")
    return bench, file.parent


# ------------------------------------------------------------------------------------------------------------- plan
@dataclass
class Run:
    """One unit of work. kind: train (source, adapt, target-only: `tmtseg.runner.fit`) or eval (source-only)."""

    key: str  # e.g. "camvid/day->dusk/tmt/seed0"
    kind: str
    task: str
    pair: str  # "a->b"; the domain for a source model or a target-only run
    method: str  # "source" for a source model
    seed: int
    cfg: Config
    out: Path = Path()
    init: str = ""  # train: the checkpoint to start from; eval: the checkpoint to score (both: of the run `after`)
    after: str = ""  # the key of the run this one needs first

    @property
    def iters(self) -> int:
        return 0 if self.kind == "eval" else self.cfg.train.iters


# A run's identity is a hash of its resolved config and of this version: bump it when the code computes something
# else for the same config (a fix), so that finished runs are not mistaken for current ones. 2: DINOv2-S sources;
# 3: the keys that only change how a run is carried out (config.RUN_NEUTRAL) are no part of it; 4: a method's config
# sections (adapt.disc, acte, tma, tvt) count only in the runs of methods that have the pieces reading them.
HASH_VERSION = 4


def config_hash(cfg: Config) -> str:
    """What a run computes: the resolved config without the keys that only say how it is carried out (where it is
    written, how often, with how many loader workers: config.RUN_NEUTRAL), with the hash version."""
    d = config_mod.to_dict(cfg)
    for dotted in config_mod.RUN_NEUTRAL:
        *path, last = dotted.split(".")
        section = d
        for part in path:
            section = section.get(part, {})
        section.pop(last, None)  # a key the config does not have (yet) is left out all the same
    a = d["adapt"]
    # a piece's section counts only in the runs of methods that have the piece: a source model, fine-tuning or LoRA
    # keep their identity when ACTE, TMA or the discriminators gain a key
    own = METHODS[a["method"]]
    for section in PIECE_SECTIONS - piece_sections(own):
        a.pop(section)
    # a regulariser or a LoRA counts only where it acts (which methods list it is no part of what a run computes)
    acting = regularisers_of(cfg.adapt)
    for kind in ("preserve", "l2sp"):
        section = a.pop(kind)
        section.pop("methods")
        if kind in acting:
            a[kind] = section
    # a method that is another plus a regulariser (lwf = finetune + KL, l2sp = finetune + L2-SP) is hashed as that
    # one with the regulariser's section: the same computation finds the same run under either name
    # (and one given LoRA by adapt.lora.methods as the one that has it: finetune + LoRA is lora)
    tuning = tuning_of(cfg.adapt)
    same = [n for n, r in METHODS.items() if not r.regularisers and (r.align, r.attention, r.tuning) ==
            (own.align, own.attention, tuning)]  # fmt: skip
    a["method"] = same[0] if same else a["method"]
    lora = a.pop("lora")
    lora.pop("methods")
    if any(kind == "lora" for _, kind in tuning):
        a["lora"] = lora
    return hashlib.sha1(json.dumps({"version": HASH_VERSION, "config": d}, sort_keys=True).encode()).hexdigest()[:10]


def _pairs(task: TaskSpec, which: str, name: str) -> list[tuple[str, str]]:
    if which == "all":
        return [(a, b) for a in task.domains for b in task.domains if a != b]
    if which != "core":
        raise ConfigError(f"bench key profiles.*.pairs={which!r}: core or all")
    out = []
    for p in task.core_pairs:
        a, _, b = p.partition("->")
        a, b = a.strip(), b.strip()
        for d in (a, b):
            if d not in task.domains:
                raise ConfigError(f"bench key tasks.{name}.core_pairs: {p!r} names an unknown domain {d!r}")
        out.append((a, b))
    return out


def _split(task_name: str, dom_name: str, splits: DomainSplits, which: str) -> SplitConfig:
    split = getattr(splits, which)
    if split is None:
        raise ConfigError(f"bench key tasks.{task_name}.domains.{dom_name}.{which}: needed by a pair, not set")
    return split


def source_checkpoint(run_dir: Path) -> Path:
    """A source model's selected checkpoint: `best` on its val split (source runs always evaluate at least once)."""
    return run_dir / "checkpoints" / "best"


@dataclass
class Plan:
    runs: list[Run]  # unique units of work, each after the run it needs
    cells: list[tuple[str, str, str, int, str]]  # (task, pair, method, seed, run key): what the report shows


def plan(bench: BenchConfig, base: Path) -> Plan:
    """Every run of the bench's profile, sources first, and the (pair, method, seed) cells they fill."""
    profile = bench.profiles[bench.profile]
    out_dir = Path(bench.output_dir)
    src_dir = Path(bench.source_dir) if bench.source_dir else out_dir / "sources"
    runs: dict[str, Run] = {}
    cells = []
    # a task's run config: a path, a file beside the bench, or a packaged run config (never a packaged bench)
    beside = [base] if base.resolve() != (PACKAGED / "bench").resolve() else []
    for tname, task in bench.tasks.items():
        base_files = [str(_resolve_file(task.config, *beside, PACKAGED))] if task.config else []
        common = [f"data.root={json.dumps(bench.data_root)}", *profile.overrides, *task.overrides]
        if bench.feature_cache:
            common.append(f"infer.feature_cache={json.dumps(str(out_dir / 'cache'))}")

        def make(train, val, extra, *, seed, source=None, _files=base_files, _common=common) -> Config:
            overrides = [*_common, *extra, f"train.seed={seed}"]
            return _run_config(_files, overrides, train=train, val=val, source=source)

        for seed in profile.seeds:
            for a, b in _pairs(task, profile.pairs, tname):
                if bench.only and tname not in bench.only and f"{tname}/{a}->{b}" not in bench.only:
                    continue
                sa, sb = task.domains[a], task.domains[b]
                pair = f"{a}->{b}"
                src_key = f"{tname}/{a}/source/seed{seed}"
                if src_key not in runs:
                    train = _split(tname, a, sa, "train")
                    cfg = make(train, sa.val or train, [*task.source, *profile.source], seed=seed)
                    runs[src_key] = _named(Run(src_key, "train", tname, a, "source", seed, cfg), src_dir)
                src = runs[src_key]
                src_ckpt = str(source_checkpoint(src.out))
                adapt, evaluate = _split(tname, b, sb, "adapt"), _split(tname, b, sb, "eval")
                for method in bench.methods:
                    key = f"{tname}/{pair}/{method}/seed{seed}"
                    if method == "source-only":
                        cfg = make(src.cfg.data.train, evaluate, [*task.source, *profile.source], seed=seed)
                        run = Run(key, "eval", tname, pair, method, seed, cfg, after=src_key, init=src_ckpt)
                    elif method == "target-only":  # from scratch: the source schedule; one run per target domain
                        key = f"{tname}/{b}/target-only/seed{seed}"
                        extra = [*task.source, *profile.source, *task.target_only, *profile.target_only]
                        cfg = make(adapt, evaluate, extra, seed=seed)
                        run = Run(key, "train", tname, b, method, seed, cfg)
                    else:
                        v = bench.variants.get(method, Variant(method=method))
                        extra = [*task.adapt, *profile.adapt, f"adapt.method={v.method}", *v.overrides,
                                 f"adapt.source_checkpoint={src_ckpt}"]  # fmt: skip
                        cfg = make(adapt, evaluate, extra, seed=seed, source=src.cfg.data.train)
                        run = Run(key, "train", tname, pair, method, seed, cfg, after=src_key, init=src_ckpt)
                    if key not in runs:
                        runs[key] = _named(run, out_dir / "runs")
                    cells.append((tname, pair, method, seed, key))
    return Plan(runs=list(runs.values()), cells=cells)


def _run_config(files: list[str], overrides: list[str], *, train, val, source) -> Config:
    cfg = config_mod.load_config(files, overrides)
    cfg.data.train, cfg.data.val = train, val
    if source is not None:
        cfg.data.source = source
    if not cfg.train.eval_every:  # every trained model is scored once at its end (and so has a `best`)
        cfg.train.eval_every = cfg.train.iters
    return config_mod.validate(cfg)


def _named(run: Run, root: Path) -> Run:
    """Place the run in a folder named by its key and config hash (+ the scored checkpoint for an evaluation)."""
    h = config_hash(run.cfg)
    if run.kind == "eval":
        h += "-" + hashlib.sha1(run.init.encode()).hexdigest()[:6]
    run.out = root / run.key.replace("->", "-to-") / h
    run.cfg = config_mod.load_config_over(run.cfg, [f"output_dir={run.out}", f"name={run.key}"])
    return run


def data_splits(bench: BenchConfig, base: Path) -> list[Config]:
    """Every split the bench names (train, val, adapt, eval of every domain), each as data.train of its task's config:
    what ``tmtseg data check BENCH.yaml`` decodes."""
    beside = [base] if base.resolve() != (PACKAGED / "bench").resolve() else []
    out = []
    for task in bench.tasks.values():
        files = [str(_resolve_file(task.config, *beside, PACKAGED))] if task.config else []
        cfg = config_mod.load_config(files, [f"data.root={json.dumps(bench.data_root)}", *task.overrides])
        for splits in task.domains.values():
            for which in ("train", "val", "adapt", "eval"):
                if (split := getattr(splits, which)) is not None:
                    out.append(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=split)))
    return out


# -------------------------------------------------------------------------------------------------------- execution
def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def execute(run: Run, threads: int) -> dict:
    """Run one unit of work in this (fresh) process; return its record. Errors come back as a record, not raised."""
    import torch

    from tmtseg.engine.loop import evaluate_checkpoint, fit
    from tmtseg.io.checkpoint import list_checkpoints

    torch.set_num_threads(threads)
    tic = time.perf_counter()
    record = {"key": run.key, "task": run.task, "pair": run.pair, "method": run.method, "seed": run.seed,
              "kind": run.kind, "hash": run.out.name, "dir": str(run.out)}  # fmt: skip
    final = run.out / "eval.json"
    # trained to the end but not recorded (killed in between): its final scores stand and nothing is redone
    trained = run.kind == "train" and final.exists() and json.loads(final.read_text())["step"] == run.cfg.train.iters
    try:
        if run.kind == "eval":
            metrics, _ = evaluate_checkpoint(run.init, overrides=_split_overrides(run.cfg), progress=False)
        elif trained:
            metrics = {k: v for k, v in json.loads(final.read_text()).items() if k not in ("step", "split")}
        else:
            resume = bool(list_checkpoints(run.out))
            metrics = fit(run.cfg, init_from="" if resume else run.init, resume=resume, progress=False)
    except TmtsegError as err:
        return {**record, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}", "exit_code": err.exit_code}
    cost = {"wall_s": None, "peak_rss_mib": None}  # unknown for a run recorded from its folder
    if not trained:
        cost = {"wall_s": time.perf_counter() - tic, "peak_rss_mib": _peak_rss_mib()}
    imgs = _mean_rate(run.out / "metrics.jsonl") if run.kind == "train" else None
    return {**record, "metrics": metrics, **cost, "imgs_per_s": imgs, "threads": threads}


def _split_overrides(cfg: Config) -> list[str]:
    """The eval split of `cfg` as dotted overrides for a checkpoint's own config."""
    d = config_mod.to_dict(cfg)["data"]
    return [f"data.root={json.dumps(d['root'])}", *(f"data.val.{k}={json.dumps(v)}" for k, v in d["val"].items())]


def _prune(run: Run, *, keep: str) -> None:
    """What a recorded run leaves on disk. The step checkpoints, kept for resuming, go (~100 MB each with DINOv2-S: a
    bench would fill the disk), and so does `best`'s training state (only step checkpoints are resumed from). `best`
    stays for source models (the only runs others start from, in this bench or another sharing its source_dir); for
    the others, when `keep` is "best"."""
    from tmtseg.io.checkpoint import STATE_FILE, list_checkpoints

    ckpts = run.out / "checkpoints"
    if run.kind != "train" or not (ckpts / "best").exists():
        return
    if keep == "sources" and run.method != "source":
        shutil.rmtree(ckpts, ignore_errors=True)
        return
    for ckpt in list_checkpoints(run.out):
        shutil.rmtree(ckpt, ignore_errors=True)
    (ckpts / "best" / STATE_FILE).unlink(missing_ok=True)


def _mean_rate(log: Path) -> float | None:
    rates = []
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "imgs_per_s" in rec:
                rates.append(rec["imgs_per_s"])
    return sum(rates) / len(rates) if rates else None


def _progress(run: Run) -> int:
    """The last logged step of a running run (0 if none yet)."""
    log = run.out / "metrics.jsonl"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            lines = f.read().decode(errors="ignore").splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def read_results(path: Path) -> dict[str, dict]:
    """(key, hash) -> the newest finished record; a line cut short by a kill is ignored."""
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "metrics" in rec:
                out[f"{rec['key']}#{rec['hash']}"] = rec
    return out


def provenance() -> dict:
    """The commit and machine a bench ran on."""
    import torch

    repo = Path(__file__).resolve().parents[3]  # the checkout holding tmtseg/
    commit = ""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def _identity(key: str, run_hash: str) -> str:
    """What makes two runs the same run: task, pair (or domain), seed and config hash. The method's name is left out,
    so that a variant renamed, or promoted to a method's default, finds the runs it already made."""
    task, pair, _name, *seed = key.split("/")
    return "/".join([task, pair, *seed]) + "#" + run_hash


def _finished(p: Plan, bench: BenchConfig) -> dict[str, dict]:
    """The plan's finished runs by key: recorded with the same config hash in this bench's results.jsonl or in that
    of a bench it reuses (under whatever method name they were recorded: they are relabelled with the plan's)."""
    recorded = {}
    for folder in [*bench.reuse, bench.output_dir]:
        for rec in read_results(Path(folder) / "results.jsonl").values():
            recorded[_identity(rec["key"], rec["hash"])] = rec
    done = {}
    for r in p.runs:
        rec = recorded.get(_identity(r.key, r.out.name))
        if rec is not None:
            done[r.key] = {**rec, "key": r.key, "method": r.method}
    return done


def describe(bench: BenchConfig, base: Path) -> str:
    """The plan, one line per run: its state (done, partial, todo), steps and folder."""
    p = plan(bench, base)
    done = _finished(p, bench)
    lines = []
    for r in p.runs:
        state = "done" if r.key in done else ("partial" if (r.out / "checkpoints").is_dir() else "todo")
        lines.append(f"{state:8s} {r.key:48s} {r.iters:6d} steps  {r.out}")
    steps = sum(r.iters for r in p.runs if r.key not in done)
    lines.append(f"{len(p.runs)} runs, {len(done)} done; {steps} training steps to go")
    return "\n".join(lines)


def report(bench: BenchConfig, base: Path, p: Plan | None = None) -> Path:
    """Write report.md, runs.csv, runs.json and the plots from the finished runs of the plan."""
    from tmtseg.tools.bench.report import write_report

    p = p or plan(bench, base)
    out_dir = Path(bench.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # --report-only of a bench that only reuses other benches' runs
    done = _finished(p, bench)
    prof = bench.profiles[bench.profile]
    commits = sorted({r.get("commit", "") for r in done.values()} - {""})
    machine = sorted({r.get("machine", "") for r in done.values()} - {""})
    header = (
        f"Bench `{bench.name}`, profile `{bench.profile}` (seeds {prof.seeds}, {prof.pairs} pairs): "
        f"{len(done)} of {len(p.runs)} runs finished. Commit(s): {', '.join(commits) or 'unknown'}; "
        f"machine: {', '.join(machine) or 'unknown'}."
    )
    order = [r.key for r in p.runs]
    title = f"Benchmark: {bench.name}"
    sessions = read_sessions(out_dir / "sessions.jsonl")
    return write_report(
        p.cells, done, order, out_dir, baseline=bench.baseline, title=title, header=header, sessions=sessions
    )


def read_sessions(path: Path) -> list[dict]:
    """The last line of each session in a sessions.jsonl (see _Session), oldest first."""
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            last[rec["start"]] = rec
    return list(last.values())


class _Session:
    """One invocation of the bench in `<output_dir>/sessions.jsonl`: a line each time a run finishes (its start, the
    time elapsed and the runs finished so far), so that a bench run over several invocations, killed or not, can state
    its machine time (report.py sums each session's last line)."""

    def __init__(self, path: Path, *, jobs: int, threads: int):
        self.path, self.tic, self.runs = path, time.perf_counter(), 0
        self.line = {"start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": jobs, "threads": threads}
        self.cut = path.exists() and not path.read_bytes().endswith(b"\n")  # the last line cut by a kill

    def ran(self, rec: dict) -> None:
        self.runs += 1
        line = {**self.line, "elapsed_s": round(time.perf_counter() - self.tic, 1), "runs": self.runs,
                "load1": round(os.getloadavg()[0], 2), "commit": rec.get("commit", "")}  # fmt: skip
        with open(self.path, "a") as f:
            f.write("\n" * self.cut + json.dumps(line) + "\n")
        self.cut = False


def run_bench(bench: BenchConfig, base: Path, *, progress: bool = True) -> Path:
    """Run every unfinished run of the plan, `bench.jobs` at a time, each in a fresh process; write the report.

    Returns the report's path. Finished runs (recorded in results.jsonl with the same
    config hash) are skipped; a run folder with checkpoints is resumed. A failed run is reported and the others go on
    (those that need it are skipped); then TrainingError names the first failure.
    """
    from tqdm import tqdm

    p = plan(bench, base)
    out_dir = Path(bench.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.jsonl"
    done = _finished(p, bench)
    # sources first: each unblocks several runs, so the parallel lanes never wait for one at the end
    queue = sorted((r for r in p.runs if r.key not in done), key=lambda r: r.method != "source")
    threads = bench.threads or max(1, (os.cpu_count() or 1) // bench.jobs)
    prov = provenance()
    cost = {r.key: max(r.iters, 10) for r in queue}  # work in steps (an evaluation counts as 10)
    failed: dict[str, str] = {}
    bar = tqdm(total=sum(cost.values()), disable=not progress, desc=bench.name, unit="step", dynamic_ncols=True)
    # to a log file (`nohup tmtseg bench ... > bench.log`): a line a minute, not one every 5 s for hours
    refresh_every, refreshed = (0.0 if sys.stderr.isatty() else 60.0), float("-inf")
    if progress and done:
        tqdm.write(f"{bench.name}: {len(done)} of {len(p.runs)} runs already finished")
    active: dict[Future, Run] = {}
    finished_units = 0
    session = _Session(out_dir / "sessions.jsonl", jobs=bench.jobs, threads=threads)
    # a fresh process per run: clean peak memory, nothing shared between runs, parallel runs on separate cores
    with ProcessPoolExecutor(max_workers=bench.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        while queue or active:
            waiting = {r.key for r in queue} | {r.key for r in active.values()}
            for r in list(queue):
                if r.after in failed:
                    queue.remove(r)
                    failed[r.key] = f"skipped: {r.after} failed"
                elif len(active) < bench.jobs and r.after not in waiting:
                    queue.remove(r)
                    active[pool.submit(execute, r, threads)] = r
            finished, _ = wait(active, timeout=5, return_when=FIRST_COMPLETED)
            for fut in finished:
                r = active.pop(fut)
                rec = fut.result()
                finished_units += cost[r.key]
                if "error" in rec:
                    failed[r.key] = rec["error"]
                    tqdm.write(f"tmtseg bench: {r.key} failed: {rec['error']} (run folder {r.out})")
                    continue
                rec.update(prov)
                with open(results_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[r.key] = rec
                _prune(r, keep=bench.keep)
                session.ran(rec)
            bar.n = finished_units + sum(min(_progress(r), r.iters) for r in active.values())
            bar.set_postfix_str("; ".join(f"{r.key} {_progress(r)}/{r.iters}" for r in active.values()), refresh=False)
            if finished or time.monotonic() - refreshed >= refresh_every:
                bar.refresh()
                refreshed = time.monotonic()
    bar.close()
    path = report(bench, base, p)
    if failed:
        from tmtseg.errors import TrainingError

        first = next(iter(failed))
        raise TrainingError(
            f"{len(failed)} bench run(s) failed or skipped, first {first}: {failed[first]} (report of the rest: {path})"
        )
    return path
