"""The two segmentation test protocols of ``eval_seg`` on one trained segmenter: mIoU and images/s.

canvas    Caffe DeepLab's "test at 513": every image at the top-left of a ``test_size`` canvas padded with the mean
          colour, batched, each scale with its horizontal flip (the ``eval_seg`` defaults)
unpadded  deeplab-pytorch's ``test``: each image whole at its own size, one per forward, no flip (``test_size:
          null, flip: false``, the configs/voc.yaml setting)

plus the two mixed settings (canvas without flip, unpadded with flip) to separate the padding's share from the
flip's. A segmenter is trained first on a generated synthetic set with its ground-truth masks as pseudo labels
(demo-like settings: ``resnet_mini``, crop 96); every protocol scores the same checkpoint on the val split,
scales 0.5 / 0.75 / 1.0 with max fusion, no CRF.

    python bench/seg_protocol.py [--steps 600 --images 1000]

Results in bench/results/seg_protocol.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.datasets.split_files import load_split_file, save_split  # noqa: E402
from storage.datasets.synthetic import generate_synthetic  # noqa: E402
from storage.datasets.voc_layout import VOCLayoutDataset  # noqa: E402
from storage.images import read_mask, write_mask  # noqa: E402
from tasks.eval_seg import EvalSegConfig, eval_seg  # noqa: E402
from tasks.train_seg import TrainSegConfig, train_seg  # noqa: E402

PROTOCOLS = {"canvas + flip (eval_seg default)": {"flip": True},
             "canvas, no flip": {"flip": False},
             "unpadded + flip": {"test_size": None, "flip": True},
             "unpadded, no flip (deeplab-pytorch test, VOC default)": {"test_size": None, "flip": False}}


def prepared_splits(root: Path, images: int) -> dict[str, str]:
    """A synthetic set (96-128 px) with its split files and the train_aug masks copied as pseudo labels."""
    generate_synthetic(str(root / "data"), num_images=images, seed=0, min_size=96, max_size=128)
    dataset = VOCLayoutDataset(str(root / "data"), "synthetic")
    urls = {}
    for name in ("train_aug", "val"):
        urls[name] = str(root / f"{name}.json")
        save_split(urls[name], dataset.load_split(name))
    train = load_split_file(urls["train_aug"])
    for image_id in train.ids:
        write_mask(str(root / "labels" / f"{image_id}.png"), read_mask(train.mask_url(image_id)))
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seg_protocol.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        urls = prepared_splits(root, args.images)
        train_cfg = TrainSegConfig(backbone="resnet_mini", norm="batch", msc_scales=(), crop=96, batch_size=8,
                                   iter_size=1, max_steps=args.steps, lr=0.01, head_lr_mult=1, head_bias_lr_mult=1,
                                   num_workers=0, checkpoint_every=args.steps)
        started = time.perf_counter()
        checkpoint = train_seg(train_cfg, urls["train_aug"], str(root / "labels"), None, str(root / "train"), 0,
                               "cpu")["checkpoint"]
        train_seconds = time.perf_counter() - started
        val_images = len(load_split_file(urls["val"]).ids)
        results = {}
        for name, settings in PROTOCOLS.items():
            cfg = EvalSegConfig(**{"test_size": 128, "crf": False, "num_workers": 0, "overlays": 0, **settings})
            summary = eval_seg(cfg, checkpoint, urls["val"], str(root / "eval"), "cpu")["summary"]
            results[name] = {"val_miou": summary["val_miou"], "images_per_second": summary["val_images_per_second"]}
            print(f"{name:55s} mIoU {summary['val_miou']:.4f}  {summary['val_images_per_second']:.1f} images/s")
    report = {"images": args.images, "val_images": val_images,
              "train_steps": args.steps, "train_seconds": round(train_seconds, 1), "canvas": 128,
              "scales": [0.5, 0.75, 1.0], "protocols": results, "load_average": os.getloadavg()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
