"""Synthetic dataset generation speed (images/s on the default 96-128 px size).

    .venv/bin/python bench/synthetic.py [--num-images 800]

Writes bench/results/synthetic.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.datasets.synthetic import generate_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=800)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = generate_synthetic(os.path.join(tmp, "syn"), num_images=args.num_images, seed=0)
    report = {"num_images": args.num_images, "seconds": summary["seconds"],
              "images_per_second": summary["images_per_second"], "cpu_count": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
