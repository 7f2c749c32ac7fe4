"""A bench's plan: one source model per (task, source domain, seed), then per (pair, method, seed) an adaptation, a
source-only evaluation or a target-only training, each in a folder named by its config hash."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tmtseg import config as config_mod
from tmtseg.config import Config, SplitConfig
from tmtseg.errors import ConfigError
from tmtseg.tools.bench.identity import config_hash
from tmtseg.tools.bench.spec import BenchConfig, DomainSplits, Selection, TaskSpec, Variant, task_files

SELECT_VERSION = 1  # the identity of the advise bench's scores and selections (bump when they compute otherwise)


@dataclass
class Run:
    """One unit of work. kind: train (source, adapt, target-only: `tmtseg.engine.loop.fit`) or eval (source-only)."""

    key: str  # e.g. "camvid/day->dusk/tmt/seed0"
    kind: str
    task: str
    pair: str  # "a->b"; the domain for a source model or a target-only run
    method: str  # "source" for a source model
    seed: int
    cfg: Config
    out: Path = Path()
    init: str = ""  # train: the checkpoint to start from; eval, score: the checkpoint to score (of the run `after`)
    after: str = ""  # the key of the run this one needs first
    # score (the advisor scores the pool once) and select (one choice from those scores): what selection.py reads
    select: dict = field(default_factory=dict)

    @property
    def iters(self) -> int:
        return self.cfg.train.iters if self.kind == "train" else 0


def _pairs(task: TaskSpec, which: str, name: str) -> list[tuple[str, str]]:
    """The pairs of the profile: every ordered pair, or the core pairs ("a->*": from a to every other domain with an
    `adapt` split, in their order)."""
    if which == "all":
        return [(a, b) for a in task.domains for b in task.domains if a != b]
    if which != "core":
        raise ConfigError(f"bench key profiles.*.pairs={which!r}: core or all")
    out = []
    for p in task.core_pairs:
        a, _, b = p.partition("->")
        a, b = a.strip(), b.strip()
        if b == "*" and a in task.domains:
            out += [(a, d) for d, s in task.domains.items() if d != a and s.adapt is not None]
            continue
        for d in (a, b):
            if d not in task.domains:
                raise ConfigError(f"bench key tasks.{name}.core_pairs: {p!r} names an unknown domain {d!r}")
        out.append((a, b))
    return out


def _needed_split(task_name: str, dom_name: str, splits: DomainSplits, which: str) -> SplitConfig:
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
    _LOADED.clear()  # the config files may have changed since the last plan
    profile = bench.profiles[bench.profile]
    out_dir = Path(bench.output_dir)
    src_dir = Path(bench.source_dir) if bench.source_dir else out_dir / "sources"
    runs: dict[str, Run] = {}
    cells = []
    for tname, task in bench.tasks.items():
        base_files = task_files(task, base)
        common = [f"data.root={json.dumps(bench.data_root)}", *profile.overrides, *task.overrides]
        if bench.feature_cache:
            common.append(f"infer.feature_cache={json.dumps(str(out_dir / 'cache'))}")

        def make(train, val, extra, *, seed, source=None, _files=base_files, _common=common) -> Config:
            overrides = [*_common, *extra, f"train.seed={seed}"]
            return _run_config(_files, overrides, train=train, val=val, source=source)

        for seed in profile.seeds:
            for a, b in _pairs(task, profile.pairs, tname):
                only = bench.only or profile.only
                if only and tname not in only and f"{tname}/{a}->{b}" not in only:
                    continue
                sa, sb = task.domains[a], task.domains[b]
                pair = f"{a}->{b}"
                src_key = f"{tname}/{a}/source/seed{seed}"
                if src_key not in runs:
                    train = _needed_split(tname, a, sa, "train")
                    cfg = make(train, sa.val or train, [*task.source, *profile.source], seed=seed)
                    runs[src_key] = _named(Run(src_key, "train", tname, a, "source", seed, cfg), src_dir)
                src = runs[src_key]
                src_ckpt = str(source_checkpoint(src.out))
                adapt, evaluate = _needed_split(tname, b, sb, "adapt"), _needed_split(tname, b, sb, "eval")
                grown = sb.schedule.get(bench.profile, [])  # the target's own schedule (steps that grow with n)
                chosen_after = src_key
                if sb.select.strategy:  # the labelled split chosen by the advisor from the pool (the advise bench)
                    pool_cfg = make(adapt, evaluate, [], seed=seed)
                    chosen_after, adapt = _selection(runs, src, pool_cfg, sb.select, f"{tname}/{pair}", out_dir)
                for method in profile.methods or bench.methods:
                    key = f"{tname}/{pair}/{method}/seed{seed}"
                    if method == "source-only":
                        cfg = make(src.cfg.data.train, evaluate, [*task.source, *profile.source], seed=seed)
                        run = Run(key, "eval", tname, pair, method, seed, cfg, after=src_key, init=src_ckpt)
                    elif method == "target-only" and sb.select.strategy:
                        raise ConfigError(f"bench key tasks.{tname}.domains.{b}.select: target-only has no source"
                                          " model to choose with; leave it out of this bench's methods")  # fmt: skip
                    elif method == "target-only":  # from scratch: the source schedule; one run per target domain
                        key = f"{tname}/{b}/target-only/seed{seed}"
                        extra = [*task.source, *profile.source, *task.target_only, *profile.target_only]
                        cfg = make(adapt, evaluate, extra, seed=seed)
                        run = Run(key, "train", tname, b, method, seed, cfg)
                    else:
                        v = bench.variants.get(method, Variant(method=method))
                        extra = [*task.adapt, *profile.adapt, *grown, f"adapt.method={v.method}", *v.overrides,
                                 f"adapt.source_checkpoint={src_ckpt}"]  # fmt: skip
                        cfg = make(adapt, evaluate, extra, seed=seed, source=src.cfg.data.train)
                        run = Run(key, "train", tname, pair, method, seed, cfg, after=chosen_after, init=src_ckpt)
                    if key not in runs:
                        runs[key] = _named(run, out_dir / "runs")
                    cells.append((tname, pair, method, seed, key))
    return Plan(runs=list(runs.values()), cells=cells)


def _selection(runs: dict, src: Run, cfg: Config, sel: Selection, name: str, out_dir: Path) -> tuple[str, SplitConfig]:
    """The advise bench's two steps before a selected target's adaptations: the source model scores the pool (its
    `adapt` split) once ("score", shared by every selection from that source), then one choice is made from the
    scores ("select"), in <output_dir>/selections/<hash>/. Each is found again by its identity: the source run's
    hash, the pool, and the strategy, budget or share, draw and seed. Returns the select run's key and the labelled
    split the adaptations read: the chosen images (files) and, at region level, their masks (label_regions)."""
    pool = cfg.data.train
    # a split key added later is no part of the pool's identity at its default (as identity.ADDED_AT does for runs)
    pooled = {k: v for k, v in dataclasses.asdict(pool).items() if k != "pseudo_labels" or v}
    ident = {"version": SELECT_VERSION, "source": src.out.name, "pool": pooled,
             "root": cfg.data.root, "scale": cfg.data.scale}  # fmt: skip
    score_hash = _short_hash(ident)
    score_key = f"{src.task}/{src.pair}/advise-scores/seed{src.seed}"
    score_out = out_dir / "selections" / f"scores-{score_hash}"
    if score_key in runs and runs[score_key].out != score_out:  # another pool from the same source
        score_key = f"{score_key[: -len(f'/seed{src.seed}')]}-{score_hash[:6]}/seed{src.seed}"
    if score_key not in runs:
        run = Run(score_key, "score", src.task, src.pair, "advise-scores", src.seed, cfg, after=src.key,
                  init=str(source_checkpoint(src.out)), out=score_out)  # fmt: skip
        runs[score_key] = run
    choice = {k: v for k, v in dataclasses.asdict(sel).items() if k != "fill" or v}  # "": as before fill existed
    sel_hash = _short_hash({"scores": score_hash, "select": choice, "seed": src.seed})
    key = f"{name}/select/seed{src.seed}"
    out = out_dir / "selections" / sel_hash
    # the random draws: one generator seed per (seed, draw), so that draws differ and every rerun draws the same
    choice.update(scores=str(score_out), random_seed=1000 * src.seed + sel.draw)
    runs.setdefault(key, Run(key, "select", src.task, name.split("/", 1)[1], "select", src.seed, cfg,
                             after=score_key, out=out, select=choice))  # fmt: skip
    labelled = dataclasses.replace(pool, files=str(out / "chosen.txt"))
    if sel.regions:
        labelled.label_regions = str(out / "masks")
        if sel.fill:
            labelled.pseudo_labels = str(out / "pseudo")
    return key, labelled


def _short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


_LOADED: dict[tuple, Config] = {}  # (files, overrides) -> the loaded config: a plan loads each distinct one once


def _run_config(files: list[str], overrides: list[str], *, train, val, source) -> Config:
    """The run's config: the files and overrides (loaded once per plan for each distinct list: the advise bench's
    462 runs have about 20, and a load through OmegaConf is a fifth of a second), then the run's splits."""
    key = (tuple(files), tuple(overrides))
    if key not in _LOADED:
        _LOADED[key] = config_mod.load_config(files, overrides)
    cfg = copy.deepcopy(_LOADED[key])
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
    # two plain strings set on a copy (the splits in it are the bench's own objects); not a reload of the whole
    # config through OmegaConf, which was a fifth of a large bench's planning time
    run.cfg = copy.deepcopy(run.cfg)
    run.cfg.output_dir, run.cfg.name = str(run.out), run.key
    return run


def data_splits(bench: BenchConfig, base: Path) -> list[Config]:
    """Every split the bench names (train, val, adapt, eval of every domain), each as data.train of its task's config:
    what ``tmtseg data check BENCH.yaml`` decodes."""
    out = []
    for task in bench.tasks.values():
        files = task_files(task, base)
        cfg = config_mod.load_config(files, [f"data.root={json.dumps(bench.data_root)}", *task.overrides])
        for splits in task.domains.values():
            for which in ("train", "val", "adapt", "eval"):
                if (split := getattr(splits, which)) is not None:
                    out.append(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=split)))
    return out
