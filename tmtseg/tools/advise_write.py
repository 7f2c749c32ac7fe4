"""The files `tmtseg advise` writes (docs/advise.md): advice.csv, the list of chosen images (chosen.txt) and the
labelled split made of them (labelled.yaml, for `-c` after the target's config), the contact sheet of the chosen
images beside their U maps, and in region mode one mask and one overlay per image."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from tmtseg.data.label_regions import partial_labels, read_region_mask
from tmtseg.errors import DataError
from tmtseg.tools.advise_select import region_mask
from tmtseg.tools.predict import save_png
from tmtseg.tools.viz import boundaries

SHEET_MAX = 24  # images on the contact sheet (the first chosen ones); the CSV and the lists hold them all
THUMB_H = 128  # thumbnail height on the contact sheet, in pixels


def _write_text(target: Path, text: str) -> Path:
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as err:
        raise DataError(f"--out {target}: cannot write ({err.strerror or err})") from None
    return target


def _score_columns(advice) -> tuple[list[str], list[np.ndarray]]:
    s = advice.scores
    named = [("u", s.u), ("one_minus_t", s.one_minus_t), ("w", s.w), ("distance", s.distance)]
    named = [(n, v) for n, v in named if v is not None]
    return [n for n, _ in named], [v for _, v in named]


def _csv(target: Path, header: list[str], rows: list[list]) -> Path:
    try:
        with target.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as err:
        raise DataError(f"--out {target}: cannot write ({err.strerror or err})") from None
    return target


def _lists(advice, pool, out: Path, picked: list[int]) -> list[Path]:
    """chosen.txt (one name a line, in the order chosen) and, for a pool read from a split, labelled.yaml: that split
    keeping only the chosen images (data.train.files), which train, finetune and adapt take with `-c`."""
    names = "".join(f"{pool.names[i]}\n" for i in picked)
    listed = _write_text(out / "chosen.txt", f"# tmtseg advise: {len(picked)} image(s) to label, best first\n{names}")
    written = [listed]
    if pool.split is not None:
        split = dataclasses.asdict(pool.split)
        if split.get("path"):
            split["path"] = str(Path(split["path"]).resolve())
        split["files"] = str(listed.resolve())
        head = (
            "# tmtseg advise: the chosen images as the labelled target split; after the target's config:\n"
            "#   tmtseg finetune -c TARGET.yaml -c labelled.yaml --checkpoint SOURCE\n"
        )
        written.append(_write_text(out / "labelled.yaml", head + yaml.safe_dump({"data": {"train": split}})))
    return written


def image_advice(advice, pool, out: Path, *, strategy: str, draw) -> list[Path]:
    """Image mode: advice.csv (file, rank, chosen, the scores; rank = order chosen, then the rest by U), the lists
    and the contact sheet (`draw(i)` scores image i again: only the chosen ones are drawn, their maps never kept;
    None = no sheet)."""
    cols, values = _score_columns(advice)
    rank = {i: r + 1 for r, i in enumerate(advice.chosen)}
    rest = [i for i in np.argsort(-advice.scores.u, kind="stable") if int(i) not in rank]
    rank.update({int(i): len(rank) + r + 1 for r, i in enumerate(rest)})
    rows = [
        [
            str(pool.files[i] or pool.names[i]),
            rank[i],
            int(i in advice.chosen),
            *(round(float(v[i]), 6) for v in values),
        ]
        for i in sorted(range(len(pool)), key=rank.get)
    ]
    written = [_csv(out / "advice.csv", ["file", "rank", "chosen", *cols], rows)]
    written += _lists(advice, pool, out, advice.chosen)
    if draw is not None:  # the bench writes no contact sheet: it would score the chosen images again
        written.append(contact_sheet(advice, pool, out / "contact_sheet.png", strategy=strategy, draw=draw))
    return written


def _heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 in matplotlib's magma colours (U, as `tmtseg viz` shows it)."""
    import matplotlib

    return (matplotlib.colormaps["magma"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _thumb(arr: np.ndarray) -> Image.Image:
    im = Image.fromarray(arr)
    return im.resize((max(1, round(im.width * THUMB_H / im.height)), THUMB_H), Image.BILINEAR)


def contact_sheet(advice, pool, target: Path, *, strategy: str, draw) -> Path:
    """The first SHEET_MAX chosen images, each beside its U map (bright = unsure), captioned rank, name and mean U."""
    tiles = []
    for r, i in enumerate(advice.chosen[:SHEET_MAX]):
        image, score = pool.read[i](), draw(i)
        pair = [_thumb(image), _thumb(_heat(score.u))]
        tile = Image.new("RGB", (pair[0].width + pair[1].width + 4, THUMB_H + 16), "white")
        tile.paste(pair[0], (0, 16))
        tile.paste(pair[1], (pair[0].width + 4, 16))
        ImageDraw.Draw(tile).text((2, 2), f"{r + 1}. {pool.names[i]}  U {advice.scores.u[i]:.3f}", fill="black")
        tiles.append(tile)
    cols = 2 if len(tiles) > 1 else 1
    width = max(t.width for t in tiles) + 8
    height = THUMB_H + 24
    sheet = Image.new("RGB", (cols * width + 8, -(-len(tiles) // cols) * height + 24), "white")
    ImageDraw.Draw(sheet).text(
        (8, 6), f"tmtseg advise --strategy {strategy}: image | U (normalised entropy, bright = unsure)", fill="black"
    )
    for n, tile in enumerate(tiles):
        sheet.paste(tile, (8 + (n % cols) * width, 24 + (n // cols) * height))
    save_png(sheet, target)
    return target


def pseudo_labels(mask: np.ndarray, pred: np.ndarray, conf: np.ndarray, *, min_prob: float = 0.0) -> np.ndarray:
    """The pseudo-label [H, W] uint8 of one image: the model's prediction `pred` outside the chosen regions (mask 0)
    where its probability `conf` is at least `min_prob`, 255 (none) elsewhere and inside the regions (the
    labeller's part)."""
    return np.where((mask == 0) & (conf >= min_prob), pred, 255).astype(np.uint8)


def region_advice(advice, pool, out: Path, *, ids_of, pseudo_of=None, min_prob: float = 0.0) -> list[Path]:
    """Region mode: masks/<name>.png for every image (255 = label this region), overlays/<name>.png for the images
    with a chosen region, advice.csv (file, chosen_share, chosen_regions, the scores) and the lists; with
    `pseudo_of(i)` -> (prediction, probability) also pseudo/<name>.png (`pseudo_labels`: what
    data.train.pseudo_labels reads to fill the pixels outside the regions)."""
    (out / "masks").mkdir(exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    if pseudo_of is not None:
        (out / "pseudo").mkdir(exist_ok=True)
    cols, values = _score_columns(advice)
    rows, written, picked = [], [], []
    for i, name in enumerate(pool.names):
        ids = ids_of(i)
        chosen = advice.regions.get(i, set())
        mask = region_mask(ids, chosen)
        save_png(mask, out / "masks" / f"{name}.png")
        written.append(out / "masks" / f"{name}.png")
        if pseudo_of is not None:
            pred, conf = pseudo_of(i)
            save_png(pseudo_labels(mask, pred, conf, min_prob=min_prob), out / "pseudo" / f"{name}.png")
            written.append(out / "pseudo" / f"{name}.png")
        if chosen:
            picked.append(i)
            save_png(region_overlay(pool.read[i](), mask), out / "overlays" / f"{name}.png")
            written.append(out / "overlays" / f"{name}.png")
        share = round(float((mask > 0).mean()), 6)
        rows.append([str(pool.files[i] or name), share, len(chosen), *(round(float(v[i]), 6) for v in values)])
    written.insert(0, _csv(out / "advice.csv", ["file", "chosen_share", "chosen_regions", *cols], rows))
    return [*written, *_lists(advice, pool, out, picked)]


def region_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with what to label at full brightness, outlined in yellow, and the rest dimmed."""
    out = np.where(mask[..., None] > 0, image, (image * 0.35).astype(np.uint8))
    out[boundaries(mask)] = (255, 230, 0)
    return out


def partial_labels_from(masks_dir: str | Path, name: str, label: np.ndarray, *, ignore_index: int = 255) -> np.ndarray:
    """The partial label of image `name` from the mask `advise --regions` wrote for it (masks/<name>.png) and its
    full label [H, W]: the label in the chosen regions, `ignore_index` elsewhere. A missing mask is a DataError. The
    data layer does the same for a split with `label_regions` (tmtseg/data/label_regions.py)."""
    return partial_labels(label, read_region_mask(masks_dir, name), ignore_index=ignore_index)
