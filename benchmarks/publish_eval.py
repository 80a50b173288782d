"""Copy a finished `ragblend eval` run (summary table and plots) into a section of docs/benchmarks.md.

    python benchmarks/publish_eval.py eval-out/synthetic --name synthetic --command "ragblend eval --synthetic 100 --out eval-out/synthetic"
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import DOCS, machine, replace_section  # noqa: E402

PLOTS = ("quality_vs_ttft.png", "ratio_sweep.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the eval's --out folder")
    parser.add_argument("--name", required=True, help="section name, also the plots' file name prefix")
    parser.add_argument("--command", required=True, help="the eval command that produced the folder")
    args = parser.parse_args()
    summary = args.out / "summary.md"
    if not summary.is_file():
        sys.exit(f"no summary.md in {args.out}: run `ragblend eval` there first")
    images = []
    for plot in PLOTS:
        if (args.out / plot).is_file():
            target = DOCS.parent / "img" / f"{args.name}_{plot}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / plot, target)
            images.append(f"![{args.name} {plot[:-4].replace('_', ' ')}](img/{target.name})")
    tables = [summary.read_text().strip()]
    for hop_summary in sorted(args.out.glob("summary-*hop.md")):
        hops = hop_summary.stem.removeprefix("summary-").removesuffix("hop")
        tables.append(f"Only the {hops}-hop questions:\n\n{hop_summary.read_text().strip()}")
    body = f"Machine: {machine()}. Command: `{args.command}`\n\n" + "\n\n".join(tables) + "\n\n" + " ".join(images)
    replace_section(f"quality-{args.name}", body)


if __name__ == "__main__":
    main()
