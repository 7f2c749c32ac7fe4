"""What each command of `tmtseg` does for the user and an example of it: the description and the epilog of its
`--help` (parser.py reads this table; tests/test_cli.py checks every command has both)."""

from __future__ import annotations

# command (as typed, "data check" for a nested one) -> (what it does, example command lines)
HELP: dict[str, tuple[str, str]] = {
    "train": (
        "Train a segmentation model with labels on data.train and score it on data.val: this is how a source model is"
        " made. The run folder (output_dir) gets config.yaml, metrics.jsonl, the last checkpoints and `best`, and"
        " eval.json; --resume continues a stopped run from its last good checkpoint.",
        "tmtseg train -c configs/camvid.yaml output_dir=runs/camvid/source\n"
        "tmtseg train -c configs/camvid.yaml output_dir=runs/camvid/source --resume",
    ),
    "finetune": (
        "Fine-tune a source model on the target split's labels (data.train), every weight, no adaptation term: the"
        " baseline every method is compared with.",
        "tmtseg finetune -c configs/camvid.yaml -c configs/camvid_dusk.yaml --checkpoint runs/camvid/source",
    ),
    "adapt": (
        "Adapt a source model to the target domain (data.train) with a method: `recommended` (the measured best), TMT"
        " or a baseline of the --method list. The source model comes from --source-checkpoint; --unsupervised trains"
        " without the target's labels.",
        "tmtseg adapt -c configs/camvid.yaml -c configs/camvid_dusk.yaml --method recommended"
        " --source-checkpoint runs/camvid/source",
    ),
    "eval": (
        "Score a checkpoint on its data.val split (overrides can point it at another split): mIoU and per-class IoU"
        " (Dice and IoU for a binary task) as a table and a JSON file. With --predictions it scores a folder of id"
        " PNGs instead (another tool's, or `tmtseg predict`'s).",
        "tmtseg eval runs/camvid/source/checkpoints/best\n"
        "tmtseg eval runs/camvid/source/checkpoints/best --predictions predictions/",
    ),
    "predict": (
        "Predict the classes of an image or of every image of a folder: a class id PNG per image (palette by"
        " default: a program reads the ids, a viewer sees colours) and an overlay; --onnx runs an exported model on"
        " onnxruntime instead of a checkpoint.",
        "tmtseg predict runs/camvid/source/checkpoints/best path/to/images --out predictions/\n"
        "tmtseg predict --onnx camvid.onnx path/to/images --out predictions/",
    ),
    "export": (
        "Export a checkpoint to an ONNX model (any image height and width) and a JSON file beside it (classes,"
        " palette, normalisation, the checkpoint's hash), then check it against PyTorch with onnxruntime; exit code"
        " 5 if it does not agree.",
        "tmtseg export runs/camvid/source/checkpoints/best --out camvid.onnx --images path/to/images",
    ),
    "viz": (
        "Draw the paper's Fig. 1 panels for a checkpoint: ACTE's regions, transferability, uncertainty and the"
        " decoder's attention, one figure per image and a grid.png.",
        "tmtseg viz runs/camvid/adapt/checkpoints/best --out viz/ --count 4",
    ),
    "diagnose": (
        "Check why TMT's parts help or not on the TMT model's data.val: does low transferability find the source"
        " model's errors, does TMA move the decoder's attention, do ACTE's regions follow the label edges. A table"
        " and a JSON file of the numbers.",
        "tmtseg diagnose --tmt runs/camvid/tmt --source runs/camvid/source --out diagnose.json",
    ),
    "data": (
        "Data tools: `tmtseg data check` reads every image and label of a dataset before a run does.",
        "tmtseg data check path/to/folder",
    ),
    "data check": (
        "Decode every image and mask of a dataset folder, a manifest folder, Cityscapes or every split of a config"
        " or bench config; report each bad file on one line and each class's share of the pixels. Exit code 2 if a"
        " file is bad.",
        "tmtseg data check path/to/folder\ntmtseg data check configs/camvid.yaml",
    ),
    "bench": (
        "Run a cross-domain benchmark: every pair of domains, method and seed of a bench config, each run in its own"
        " process; finished runs are skipped and stopped ones resumed when it is run again. Writes report.md, CSV and"
        " JSON tables and plots into its output folder.",
        "tmtseg bench core --dry-run\ntmtseg bench core --profile full\n"
        "nohup tmtseg bench driving --profile full > driving.log 2>&1 &",
    ),
    "weights": (
        "Pretrained ViT weights: list the known names and what is cached, or fetch, check, convert and cache one.",
        "tmtseg weights list\ntmtseg weights get dinov2_vits14",
    ),
    "weights list": (
        "List the known pretrained weights, which of them are cached and where the cache is.",
        "tmtseg weights list",
    ),
    "weights get": (
        "Fetch a known pretrained weight by its package name, check it, convert it to the ViT's layout and"
        " cache it; once cached, it does nothing.",
        "tmtseg weights get dinov2_vits14",
    ),
    "advise": (
        "Which target images (or regions) to label first: every image of the pool is scored with the model (its"
        " uncertainty U, ACTE's 1 - T and TMA's W where the checkpoint has them, and how far it lies from the images"
        " already chosen), and the best --budget images (or --regions PCT % of the pixels) are chosen. Writes"
        " advice.csv, chosen.txt, labelled.yaml (a split that finetune/adapt take as they are) and a contact sheet.",
        "tmtseg advise runs/camvid/source data/dusk_frames --budget 16 --out advice/\n"
        "tmtseg advise runs/camvid/source configs/camvid_dusk.yaml --regions 5 --out advice_regions/",
    ),
    "demo": (
        "The built-in demo, offline, on synthetic data, as the workflow a user follows: a source model, `advise` on"
        " which target images to label, adaptation on those with `recommended`, `tmt` and fine-tuning, a results"
        " table set beside the real benches' ranking, pictures, an ONNX export and the line of Python that loads the"
        " result. The data are synthetic; the real benches give the real numbers (docs/results.md).",
        "tmtseg demo --out runs/demo\ntmtseg demo --quick --out runs/demo_quick",
    ),
}


def texts(command: str) -> dict:
    """`description` and `epilog` keyword arguments of add_parser for `command`: what it does, then its examples."""
    what, examples = HELP[command]
    lines = examples.splitlines()
    head = "examples:" if len(lines) > 1 else "example:"
    return {"description": what, "epilog": head + "\n\n" + "\n".join(f"  {line}" for line in lines)}
