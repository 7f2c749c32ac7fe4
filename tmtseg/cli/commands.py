"""The training, evaluation and tool commands of `tmtseg`, and COMMANDS: the function that runs each command.

Imports of torch and of the library's heavy parts stay inside the functions: `tmtseg --help` stays fast."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tmtseg.cli.data_commands import DATA_COMMANDS


def _load(args) -> Config:  # noqa: F821
    from tmtseg.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args) -> int:
    from tmtseg import dist
    from tmtseg.engine.loop import fit
    from tmtseg.metrics import format_table

    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start the workers; each runs this command without --nproc
        rest, skip = [], False
        for token in args.argv:
            if skip or token == "--nproc" or token.startswith("--nproc="):
                skip = token == "--nproc"
                continue
            rest.append(token)
        return dist.launch_local(args.nproc, ["-m", "tmtseg", *rest], quiet=not args.debug)

    cfg = _load(args)
    _refuse_config_overwrite(args.config, cfg, resume=args.resume)
    init = ""
    if args.command == "finetune":
        from tmtseg.config import load_config_over

        cfg = load_config_over(cfg, ["adapt.method=finetune", f"adapt.source_checkpoint={args.checkpoint}"])
        init = args.checkpoint
    elif args.command == "adapt":
        from tmtseg.config import load_config_over

        extra = []
        if args.method:
            extra.append(f"adapt.method={args.method}")
        if args.source_checkpoint:
            extra.append(f"adapt.source_checkpoint={args.source_checkpoint}")
        if args.unsupervised:
            extra.append("adapt.unsupervised=true")
        cfg = load_config_over(cfg, extra)
        if not cfg.adapt.source_checkpoint:
            from tmtseg.errors import ConfigError

            raise ConfigError("config key adapt.source_checkpoint: adapt needs a source model (--source-checkpoint)")
        init = cfg.adapt.source_checkpoint
    metrics = fit(cfg, init_from="" if args.resume else init, resume=args.resume, progress=not args.no_progress,
                  allow_changed_inputs=args.allow_changed_inputs)  # fmt: skip
    if dist.is_main():
        print(format_table(metrics, title=f"{cfg.name}: {cfg.adapt.method if init else 'train'} -> data.val"))
        print(f"run folder: {cfg.output_dir}")
    return 0


def _refuse_config_overwrite(files: list[str], cfg, *, resume: bool) -> None:
    """A run writes its resolved config to <output_dir>/config.yaml: refuse when that is a config file given with -c
    whose text would change (resuming a run from its own config.yaml updates the run's record, which is fine)."""
    from tmtseg.config import to_yaml
    from tmtseg.errors import ConfigError

    written = (Path(cfg.output_dir) / "config.yaml").resolve()
    for name in files:
        if not resume and Path(name).resolve() == written and Path(name).read_text() != to_yaml(cfg):
            raise ConfigError(
                f"config key output_dir={cfg.output_dir}: the run would overwrite its input config {name}; copy it"
                " elsewhere or set another output_dir"
            )


def _cmd_eval(args) -> int:
    from tmtseg.engine.evaluate import evaluate_checkpoint
    from tmtseg.errors import DataError
    from tmtseg.io.checkpoint import MODEL_FILE
    from tmtseg.io.files import write_atomically
    from tmtseg.metrics import format_table
    from tmtseg.tools.predict import make_out_dir, refuse_overwrite

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "eval.json"
    # checked before the evaluation: the metrics go to a JSON file, never over the checkpoint or another input
    if out.suffix != ".json" or out.is_dir():
        raise DataError(f"--out {out}: the metrics are written as JSON; give a file name ending in .json")
    refuse_overwrite([out], [ckpt, ckpt / MODEL_FILE], option="--out")
    if args.predictions:  # another tool's ids (or predict's) scored with our metric on the checkpoint's data.val
        from tmtseg.engine.evaluate import evaluate_predictions
        from tmtseg.engine.restore import model_with_loss_from_checkpoint

        cfg = model_with_loss_from_checkpoint(args.checkpoint, args.overrides)[1]  # its config, checked as eval does
        metrics = evaluate_predictions(cfg, Path(args.predictions))
        title = f"{args.predictions} on {args.checkpoint}'s data.val"
    else:
        from tmtseg.engine.step import precision_line

        metrics, cfg = evaluate_checkpoint(args.checkpoint, overrides=args.overrides, progress=not args.no_progress,
                                           allow_changed_inputs=args.allow_changed_inputs)  # fmt: skip
        print(precision_line(cfg.train.amp))
        title = f"{args.checkpoint} on data.val"
    print(format_table(metrics, title=title))
    make_out_dir(out.parent, option="--out")
    text = json.dumps({"checkpoint": str(ckpt), "val": _split_dict(cfg), **metrics}, indent=1)
    try:  # whole or not at all: a kill or a full disk mid-write leaves the previous eval.json as it was
        write_atomically(out, lambda tmp: tmp.write_text(text))
    except OSError as err:
        raise DataError(f"--out {out}: cannot write ({err.strerror})") from None
    print(f"metrics: {out}")
    return 0


def _split_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg.data.val)


def _cmd_diagnose(args) -> int:
    from tqdm import tqdm

    from tmtseg.errors import DataError
    from tmtseg.tools.bench import provenance
    from tmtseg.tools.diagnose import diagnose, format_report, load_models, resolve_checkpoint
    from tmtseg.tools.predict import make_out_dir, refuse_overwrite

    ckpt = resolve_checkpoint(args.tmt)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "diagnose.json"
    if out.suffix != ".json" or out.is_dir():
        raise DataError(f"--out {out}: the numbers are written as JSON; give a file name ending in .json")
    inputs = [Path(p) for p in (args.tmt, args.source, args.tvt, args.finetune) if p]
    refuse_overwrite([out], [*inputs, *(p / "model.safetensors" for p in inputs)], option="--out")
    if args.tolerance < 0 or not 0.0 <= args.min_valid <= 1.0:
        raise DataError(
            f"--tolerance {args.tolerance} / --min-valid {args.min_valid}: need >= 0 / a fraction in [0, 1]"
        )
    models, cfg = load_models(
        tmt=args.tmt, source=args.source, tvt=args.tvt, finetune=args.finetune, overrides=args.overrides
    )
    if cfg.adapt.tma.where == "decoder":
        result = diagnose(
            models,
            cfg,
            limit=args.limit or 0,
            min_valid=args.min_valid,
            low_t=args.low_t,
            tolerance=args.tolerance,
            progress=None if args.no_progress else tqdm,
        )
        print(format_report(result))
    else:  # TMT inside the ViT: T, U, W against the source's error, and the ViT's attention (tools/diagnose/vit.py)
        from tmtseg.tools.diagnose.vit import diagnose_vit, format_vit

        progress = None if args.no_progress else tqdm
        result = diagnose_vit(models, cfg, limit=args.limit or 0, min_valid=args.min_valid, progress=progress)
        print(format_vit(result))
    make_out_dir(out.parent, option="--out")
    try:
        out.write_text(json.dumps({"argv": args.argv, **provenance(), **result}, indent=1))
    except OSError as err:
        raise DataError(f"--out {out}: cannot write ({err.strerror})") from None
    print(f"numbers: {out}")
    return 0


def _cmd_advise(args) -> int:
    from tmtseg.api import load

    model = load(args.checkpoint)
    advice = model.advise(
        args.target,
        args.out,
        budget=args.budget,
        regions=args.regions,
        strategy=args.strategy,
        seed=args.seed,
        progress=not args.no_progress,
        note=lambda line: print(f"tmtseg: note: {line}", file=sys.stderr),
    )
    if advice.regions is None:
        print(f"chosen ({advice.strategy}): " + ", ".join(advice.names[i] for i in advice.chosen))
    else:
        print(f"regions chosen in {len(advice.regions)} of {len(advice.names)} image(s) ({advice.strategy})")
    print(f"advice: {Path(args.out) / 'advice.csv'}")
    return 0


def _cmd_bench(args) -> int:
    from tmtseg.tools.bench import describe, load_bench, report, run_bench

    overrides = list(args.overrides)
    if args.profile:
        overrides.append(f"profile={args.profile}")
    if args.jobs:
        overrides.append(f"jobs={args.jobs}")
    flags = {"launcher": args.launcher, "slurm.partition": args.partition, "slurm.gpus_per_run": args.gpus_per_run,
             "slurm.time_min": args.time_limit}  # fmt: skip
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    bench, base = load_bench(args.bench_config, overrides)
    if args.dry_run:
        print(describe(bench, base))
        return 0
    path = report(bench, base) if args.report_only else run_bench(bench, base, progress=not args.no_progress)
    print(Path(path).read_text())
    print(f"report: {path}")
    return 0


def _cmd_demo(args) -> int:
    from tmtseg.tools.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, overrides=args.overrides, progress=not args.no_progress)
    return 0


def _cmd_weights(args) -> int:
    from tmtseg.modeling.backbones import weights

    if args.weights_command == "get":
        path = weights.get(args.name, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(path)
        return 0
    print(f"cache: {weights.cache_dir()}  (set TMTSEG_HOME to move it)")
    for name, info in weights.KNOWN.items():
        path = weights.cached(name)
        where = str(path) if path else f"not cached: tmtseg weights get {name}"
        arch = info["arch"]
        shape = f"ViT {arch['embed_dim']}x{arch['depth']}, {arch['num_heads']} heads, patch {arch['patch_size']}"
        print(f"{name}  {info['description']}; {shape}\n    {where}")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "finetune": _cmd_train,
    "adapt": _cmd_train,
    "eval": _cmd_eval,
    **DATA_COMMANDS,  # predict, export, data, viz
    "advise": _cmd_advise,
    "diagnose": _cmd_diagnose,
    "bench": _cmd_bench,
    "demo": _cmd_demo,
    "weights": _cmd_weights,
}
