"""The image and dataset commands of `tmtseg`: predict, export, viz and data check, and DATA_COMMANDS naming them.

Imports of torch and of the library's heavy parts stay inside the functions: `tmtseg --help` stays fast."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def _cmd_predict(args) -> int:
    from tqdm import tqdm

    from tmtseg.tools.predict import parse_formats

    progress = None if args.no_progress else tqdm
    formats = parse_formats(args.format)
    if args.onnx:
        from tmtseg.errors import ConfigError
        from tmtseg.tools.export import predict_onnx

        if args.input is not None or args.overrides or args.precision != "checkpoint":
            raise ConfigError(
                "predict --onnx MODEL takes one IMAGE_OR_FOLDER, no checkpoint, no overrides and no --precision"
            )
        print("inference precision: float32 (the ONNX graph's)")
        written = predict_onnx(
            args.onnx, Path(args.checkpoint), Path(args.out), formats=formats, jsonl=args.jsonl, progress=progress
        )
        print(f"wrote {written} files to {args.out}")
        return 0
    from tmtseg.engine.restore import model_with_loss_from_checkpoint
    from tmtseg.tools.predict import outputs_of, precision_of, predict_folder

    if args.input is None:
        from tmtseg.errors import ConfigError

        raise ConfigError("predict needs CHECKPOINT IMAGE_OR_FOLDER (or --onnx MODEL IMAGE_OR_FOLDER)")
    trainer, cfg, meta = model_with_loss_from_checkpoint(args.checkpoint, args.overrides)
    ckpt = Path(args.checkpoint)
    print(precision_of(cfg, args.precision)[1])
    written = predict_folder(
        trainer,
        cfg,
        meta,
        Path(args.input),
        Path(args.out),
        outputs=outputs_of(cfg, meta, formats=formats, jsonl=args.jsonl),
        progress=progress,
        protected=[ckpt, ckpt / "model.safetensors"],
        note=print,
        precision=args.precision,
    )
    print(f"wrote {written} files to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from tmtseg.tools.export import export_checkpoint
    from tmtseg.tools.predict import list_images

    images = list_images(Path(args.images))[:3] if args.images else []
    info = export_checkpoint(
        args.checkpoint,
        args.out,
        overrides=args.overrides,
        with_masks=args.with_masks,
        images=images,
        quantize=args.quantize,
    )
    par = info["parity"]
    print(
        f"wrote {args.out} and {Path(args.out).with_suffix('.json')} (opset {info['opset']}); parity on"
        f" {sum('batch' not in c for c in par['checks'])} images and a batch of 2: max |diff|"
        f" {par['max_abs_diff']:.2e}, argmax agreement"
        f" >= {100 * par['min_argmax_agreement_seen']:.3f}%"
    )
    if "int8" in info.get("variants", {}):
        int8 = Path(args.out).with_name(info["variants"]["int8"])
        q = json.loads(int8.with_suffix(".json").read_text())["quantization"]["parity_vs_fp32"]
        print(
            f"wrote {int8} and {int8.with_suffix('.json')} (int8 MatMuls); argmax agreement with the fp32 model"
            f" >= {100 * q['min_argmax_agreement_seen']:.3f}% (required {100 * q['min_argmax_agreement']:g}%)"
        )
    return 0


def _cmd_viz(args) -> int:
    import numpy as np
    import torch

    from tmtseg.engine.restore import model_with_loss_from_checkpoint
    from tmtseg.tools.predict import list_images, make_out_dir, output_names, read_image, refuse_overwrite
    from tmtseg.tools.viz import compute_panels, draw_figure, draw_grid

    out = Path(args.out)
    inputs = list_images(Path(args.input)) if args.input else []
    out_names = output_names(inputs)
    refuse_overwrite([out / "grid.png", *(out / f"{n}.png" for n in out_names.values())], inputs, option="--out")
    trainer, cfg, meta = model_with_loss_from_checkpoint(args.checkpoint, args.overrides)
    depth = cfg.model.dec_layers
    bad = [n for n in args.layers if not -depth <= n < depth]
    if bad:
        from tmtseg.errors import ConfigError

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
        items = _val_items(cfg, args.count)
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


def _val_items(cfg, count: int) -> list[tuple]:
    """(name, image, label) of the first `count` images of data.val, each label at its image's size."""
    import torch

    from tmtseg.data import build_dataset

    ds = build_dataset(cfg.data.val, cfg.data, train=False)
    items = []
    for i in range(min(count, len(ds))):
        item = ds[i]
        label = item["label"]
        if label.shape[-2:] != item["image"].shape[-2:]:  # labels stay at full resolution: match the image
            label = torch.nn.functional.interpolate(
                label[None, None].float(), size=item["image"].shape[-2:], mode="nearest"
            )[0, 0].long()
        items.append((Path(str(item["name"])).stem, item["image"], label))
    return items


def _check_targets(target: Path, overrides: list[str]):
    """(cfg, splits) pairs to check for a config file or a dataset folder."""
    from tmtseg.config import SplitConfig, load_config, load_config_over

    if target.suffix in (".yaml", ".yml") and target.is_file():
        import yaml

        try:
            data = yaml.safe_load(target.read_text())
        except yaml.YAMLError:
            data = None  # load_config names the error
        if isinstance(data, dict) and "tasks" in data:  # a bench config: every split of every domain
            from tmtseg.tools.bench import data_splits, load_bench

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
        from tmtseg.errors import DataError

        raise DataError(f"{target}: not a config file, folder dataset (dataset.yaml), manifest folder or Cityscapes")
    base = load_config([], overrides)
    out = []
    if kind == "manifest":
        from tmtseg.data.sources import read_manifest

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
        from tmtseg.data.folders import read_folder_yaml as _read_folder_yaml

        classes = _read_folder_yaml(target / "dataset.yaml")["classes"]
        cfg = load_config_over(base, [f"data.num_classes={len(classes)}"])
        cfg.data.train = SplitConfig(kind="folder", path=str(target))
        out.append((cfg, ("train",)))
    return out


def _cmd_data(args) -> int:
    from tmtseg.data import data_report

    target = Path(args.target)
    if not target.exists():
        from tmtseg.errors import DataError

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


DATA_COMMANDS = {
    "predict": _cmd_predict,
    "export": _cmd_export,
    "data": _cmd_data,
    "viz": _cmd_viz,
}
