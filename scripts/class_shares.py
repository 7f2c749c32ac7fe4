"""Class pixel shares per domain before and after a config's data.label_map (the check of docs/results.md's mapping).

    python scripts/class_shares.py                          # the driving task: CamVid day, dusk, IDD-Lite, BDD100K
    python scripts/class_shares.py -c my.yaml DATASET:DOMAIN ...

Prints markdown: per domain, each dataset class's share and the task class it goes to; then the task classes' shares
per domain. Shares are of all pixels of every labelled image of the domain here (void included, as its own row).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tmtseg.config import SplitConfig, load_config
from tmtseg.data.label_map import class_shares
from tmtseg.data.sources import list_source
from tmtseg.errors import TmtsegError

DRIVING = ["camvid-daydusk:day", "camvid-daydusk:dusk", "idd-lite:idd", "bdd100k-sample:bdd"]
CONFIG = Path(__file__).resolve().parents[1] / "tmtseg" / "configs" / "driving.yaml"


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(CONFIG), help="a task config with data.label_map")
    parser.add_argument("domains", nargs="*", default=DRIVING, help="DATASET:DOMAIN of manifest datasets")
    args = parser.parse_args(argv)
    try:
        cfg = load_config([args.config])
        after_cols, task_classes = {}, list(cfg.data.class_names)
        for item in args.domains:
            dataset, _, domain = item.partition(":")
            split = SplitConfig(kind="manifest", dataset=dataset, domain=domain)
            raw = list_source(split, replace(cfg.data, label_map={}), check_classes=False)
            mapped = list_source(split, cfg.data, check_classes=False)
            before = class_shares(raw.records, raw.decoder, num_classes=len(raw.class_names))
            after = class_shares(mapped.records, mapped.decoder, num_classes=len(mapped.class_names))
            after_cols[domain] = after
            targets = cfg.data.label_map.get(dataset, {})
            print(f"\n{dataset}, domain {domain} ({len(raw.records)} labels): before mapping\n")
            print("| class | share % | mapped to |\n|---|---:|---|")
            for name, share in sorted(zip(raw.class_names, before), key=lambda x: -x[1]):
                print(f"| {name} | {pct(share)} | {targets.get(name, '(not mapped)')} |")
            print(f"| void | {pct(before[-1])} | ignore |")
        print("\nAfter mapping: task class shares % per domain\n")
        print("| class | " + " | ".join(after_cols) + " |\n|---|" + "---:|" * len(after_cols))
        for k, name in enumerate([*task_classes, "ignore"]):
            print(f"| {name} | " + " | ".join(pct(col[k]) for col in after_cols.values()) + " |")
    except TmtsegError as err:
        print(f"class_shares: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
