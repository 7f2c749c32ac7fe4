"""A bench config (benchmark.md): the YAML that names the data root, each task's base config and its domains with their
splits, the pairs, the methods (and named variants for ablations), the seeds and a profile; read over the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tmtseg.adapt.registry import METHOD_ALIASES, METHODS
from tmtseg.config import SplitConfig
from tmtseg.errors import ConfigError
from tmtseg.tools.advise_select import REGION_STRATEGIES, STRATEGIES

PACKAGED = Path(__file__).resolve().parents[2] / "configs"  # tmtseg/configs
ADAPT_METHODS = tuple(METHODS)
REFERENCE_METHODS = ("source-only", "target-only")


@dataclass
class Selection:
    """How a target's labelled split is chosen from its `adapt` split, the pool (the advise bench, docs/advise.md):
    `tmtseg advise` on the pair's source model picks `budget` whole images by `strategy` (one of advise's image
    strategies), or with `regions` the regions of highest score (or at random) up to that % of the pool's pixels,
    whose labels alone are kept; `draw` numbers the draws of `random` (each its own seeded choice). An empty strategy
    = no selection: the whole `adapt` split is labelled."""

    strategy: str = ""
    budget: int = 0  # images (image level)
    regions: float = 0.0  # % of the pool's pixels (region level); 100 = every pixel (the ceiling)
    draw: int = 0
    # region level: "pseudo" = the pixels outside the chosen regions take the source model's prediction
    # (data.train.pseudo_labels), "" = they are ignored
    fill: str = ""


@dataclass
class DomainSplits:
    """A domain's splits: `train` / `val` when it is a source (training, model selection); `adapt` / `eval` when it is
    a target (the labelled target split, the scored split). A split a pair needs and the domain lacks is an error."""

    train: SplitConfig | None = None
    val: SplitConfig | None = None
    adapt: SplitConfig | None = None
    eval: SplitConfig | None = None
    # per profile, config overrides of every adaptation run that trains on this domain's `adapt` split,
    # after the task's and the profile's schedules: a schedule that grows with the labelled split (the budget bench)
    schedule: dict[str, list[str]] = field(default_factory=dict)
    labelled: int = 0  # as a target: how many labelled images its `adapt` split holds (the report's budget plot)
    select: Selection = field(default_factory=Selection)  # as a target: its labelled images (or regions) chosen


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
    only: list[str] = field(default_factory=list)  # as the bench's `only`, for this profile (the bench's wins)
    methods: list[str] = field(default_factory=list)  # this profile's methods, a subset of the bench's; [] = all


LAUNCHERS = ("local", "slurm", "local-submitit")  # tools/bench/launch.py


@dataclass
class ClusterSettings:
    """`slurm`: how `launcher: slurm` (and `local-submitit`) submit each run as one submitit job. None of it enters a
    run's identity: the same run on a laptop or a cluster has the same folder and hash."""

    partition: str = ""  # the Slurm partition ("" = the cluster's default)
    gpus_per_run: int = 0  # GPUs of each job; a run's `device: auto` then trains on CUDA
    cpus_per_run: int = 0  # torch threads and cores of each job; 0 = `threads`, else 4 (slurm) or cores / jobs
    time_min: int = 240  # each job's time limit; a run it cuts off resumes when the bench is run again
    mem_gb: int = 0  # memory of each job; 0 = the cluster's default
    folder: str = ""  # submitit's job files and logs; "" = <output_dir>/submitit


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
    # how runs are launched: local (fresh processes here), slurm (one submitit job per run; `pip install
    # 'tmtseg[slurm]'`), local-submitit (submitit's jobs run on this machine: a check of the cluster path)
    launcher: str = "local"
    slurm: ClusterSettings = field(default_factory=ClusterSettings)
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
    for m in bench.methods:  # `recommended` in methods: the variant its alias stands for, under its own name
        if m in METHOD_ALIASES and m not in bench.variants:
            alias = METHOD_ALIASES[m]
            bench.variants[m] = Variant(method=alias.method, overrides=list(alias.overrides))
    known = {*ADAPT_METHODS, *REFERENCE_METHODS, *bench.variants}
    for m in bench.profiles[bench.profile].methods:
        if m not in bench.methods:
            raise ConfigError(f"{file}: bench key profiles.{bench.profile}.methods: {m!r} is not among the methods")
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
    if bench.launcher not in LAUNCHERS:
        raise ConfigError(f"{file}: bench key launcher={bench.launcher!r}: one of {', '.join(LAUNCHERS)}")
    if min(bench.slurm.gpus_per_run, bench.slurm.cpus_per_run, bench.slurm.mem_gb) < 0 or bench.slurm.time_min < 1:
        raise ConfigError(f"{file}: bench key slurm: gpus_per_run, cpus_per_run, mem_gb >= 0 and time_min >= 1")
    for tname, task in bench.tasks.items():
        for dname, dom in task.domains.items():
            check_selection(dom.select, f"{file}: bench key tasks.{tname}.domains.{dname}.select")
    if bench.keep not in ("best", "sources"):
        raise ConfigError(f"{file}: bench key keep={bench.keep!r}: best or sources")
    return bench, file.parent


def check_selection(sel: Selection, where: str) -> None:
    """A selection names an advise strategy of its level and exactly one of budget >= 1 and regions in (0, 100]."""
    if not sel.strategy:
        if sel.budget or sel.regions or sel.draw:
            raise ConfigError(f"{where}: budget, regions or draw without a strategy")
        return
    if (sel.budget > 0) == (sel.regions > 0):
        raise ConfigError(f"{where}: give budget (images) or regions (% of the pixels), one of the two")
    allowed = STRATEGIES if sel.budget else REGION_STRATEGIES
    if sel.strategy not in allowed:
        raise ConfigError(f"{where}.strategy={sel.strategy!r}: one of {', '.join(allowed)}")
    if sel.regions > 100.0 or sel.budget < 0 or sel.draw < 0:
        raise ConfigError(f"{where}: regions in (0, 100], budget >= 1, draw >= 0")
    if sel.fill not in ("", "pseudo") or (sel.fill and not sel.regions):
        raise ConfigError(f"{where}.fill={sel.fill!r}: '' or pseudo, and pseudo only at region level (regions)")


def task_files(task: TaskSpec, base: Path) -> list[str]:
    """A task's run config: a path, a file beside the bench (in `base`), or a packaged run config; never a file beside
    a packaged bench (configs/bench/ holds benches, not run configs)."""
    beside = [base] if base.resolve() != (PACKAGED / "bench").resolve() else []
    return [str(_resolve_file(task.config, *beside, PACKAGED))] if task.config else []
