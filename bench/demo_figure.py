"""The README's picture of a demo run: CAM, pseudo-label and segmentation overlays stacked into one PNG.

    .venv/bin/python bench/demo_figure.py runs/synthetic-demo docs/demo_overlays.png

Each row is one overlay the run's evaluations wrote: the CAMs (image, ground truth, P, K) and the pseudo labels
of the same training images, then segmentation predictions (image, ground truth, without and with CRF) on val images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = (("eval_cam/overlays", "CAMs: image, ground truth, prototype CAM P, PCM CAM K"),
        ("eval_pseudo_labels/pseudo_label_eval_overlays", "pseudo labels: image, ground truth, labels"),
        ("eval_seg/seg_overlays", "segmentation (val): image, ground truth, prediction, with CRF"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--per-row", type=int, default=2, help="overlays of each kind")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    tiles = []
    for folder, _ in ROWS:
        names = sorted((run_dir / folder).glob("*.png"))[: args.per_row]
        if not names:
            raise SystemExit(f"{run_dir / folder}: no overlays (is {args.run_dir} a finished demo run?)")
        tiles.extend(Image.open(name).convert("RGB") for name in names)
    width = max(tile.width for tile in tiles)
    canvas = Image.new("RGB", (width, sum(tile.height for tile in tiles)), (255, 255, 255))
    top = 0
    for tile in tiles:
        canvas.paste(tile, (0, top))
        top += tile.height
    canvas.save(args.out)
    print(f"wrote {args.out}: " + "; ".join(f"{args.per_row} x {caption}" for _, caption in ROWS))


if __name__ == "__main__":
    main()
