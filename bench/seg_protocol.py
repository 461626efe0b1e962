"""The two segmentation test protocols of ``eval_seg``, and the CRF's image input, on one trained segmenter.

canvas    Caffe DeepLab's "test at 513": every image at the top-left of a ``test_size`` canvas padded with the mean
          colour, batched, each scale with its horizontal flip (the ``eval_seg`` defaults)
unpadded  deeplab-pytorch's ``test``: each image whole at its own size, one per forward, no flip (``test_size:
          null, flip: false``, the configs/voc.yaml setting)

plus the two mixed settings (canvas without flip, unpadded with flip) to separate the padding's share from the
flip's. A segmenter is trained first on a generated synthetic set with its ground-truth masks as pseudo labels
(demo-like settings: ``resnet_mini``, crop 96); every protocol scores the same checkpoint on the val split,
scales 0.5 / 0.75 / 1.0 with max fusion, no CRF: mIoU and images/s.

CRF input: the probabilities of the unpadded protocol refined by the dense CRF (deeplab-pytorch's parameters) with
the RGB image (``eval_seg``) and with deeplab-pytorch's input, the mean-subtracted BGR float image cast to uint8,
which wraps every value below the mean around to 256 - x (x86 casting, emulated exactly).

    python bench/seg_protocol.py [--steps 600 --images 1000]
    python bench/seg_protocol.py --scaling earlier --out /tmp/earlier.json   # trained with U(0.5, 1.5) + PIL bilinear

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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.crf import crf_from_probs  # noqa: E402
from models.metrics import ConfusionMatrix  # noqa: E402
from storage.datasets.split_files import load_split_file, save_split  # noqa: E402
from storage.datasets.synthetic import generate_synthetic  # noqa: E402
from storage.datasets.voc_layout import VOCLayoutDataset  # noqa: E402
from storage.images import read_mask, read_rgb, write_mask  # noqa: E402
from tasks.engine.seg_prediction import predict_probs  # noqa: E402
from tasks.eval_seg import EvalSegConfig, eval_seg, load_segmenter  # noqa: E402
from tasks.train_seg import TrainSegConfig, train_seg  # noqa: E402

SCALINGS = {"deeplab": {}, "earlier": {"scale_range": (0.5, 1.5), "scale_interpolation": "pil_bilinear"}}
PROTOCOLS = {"canvas + flip (eval_seg default)": {"flip": True},
             "canvas, no flip": {"flip": False},
             "unpadded + flip": {"test_size": None, "flip": True},
             "unpadded, no flip (deeplab-pytorch test, VOC default)": {"test_size": None, "flip": False}}
DEEPLAB_MEAN_BGR = np.array([104.008, 116.669, 122.675], dtype=np.float32)


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


def deeplab_crf_image(rgb: np.ndarray) -> np.ndarray:
    """deeplab-pytorch's CRF image: ``(BGR - mean).astype(np.uint8)``, negatives wrapped as x86 casts them
    (truncation toward zero, then modulo 256)."""
    shifted = rgb[..., ::-1].astype(np.float32) - DEEPLAB_MEAN_BGR
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8))


def crf_inputs(checkpoint: str, val_url: str) -> dict[str, float]:
    """val mIoU of the unpadded protocol without CRF, with the CRF on the RGB image and on deeplab's image."""
    split = load_split_file(val_url)
    model = load_segmenter(checkpoint, split.class_names)
    cfg = EvalSegConfig(test_size=None, flip=False, num_workers=0)
    matrices = {name: ConfusionMatrix(len(split.class_names)) for name in ("no CRF", "CRF on RGB (eval_seg)",
                                                                            "CRF on wrapped BGR - mean (deeplab)")}
    for image_id, probs in predict_probs(model, split, split.ids, cfg.prediction, torch.device("cpu")):
        rgb, target = read_rgb(split.image_url(image_id)), read_mask(split.mask_url(image_id))
        predictions = [probs, crf_from_probs(np.array(rgb), probs), crf_from_probs(deeplab_crf_image(rgb), probs)]
        for matrix, prediction in zip(matrices.values(), predictions):
            matrix.update(target, prediction.argmax(0))
    return {name: matrix.scores(split.class_names)["miou"] for name, matrix in matrices.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--scaling", choices=sorted(SCALINGS), default="deeplab",
                        help="training scale augmentation: deeplab's set + linear (default) or the earlier "
                             "continuous U(0.5, 1.5) + PIL bilinear")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seg_protocol.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        urls = prepared_splits(root, args.images)
        train_cfg = TrainSegConfig(backbone="resnet_mini", norm="batch", msc_scales=(), crop=96, batch_size=8,
                                   iter_size=1, max_steps=args.steps, lr=0.01, head_lr_mult=1, head_bias_lr_mult=1,
                                   num_workers=0, checkpoint_every=args.steps, **SCALINGS[args.scaling])
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
        crf = crf_inputs(checkpoint, urls["val"])
    report = {"images": args.images, "val_images": val_images, "scaling": args.scaling,
              "train_steps": args.steps, "train_seconds": round(train_seconds, 1), "canvas": 128,
              "scales": [0.5, 0.75, 1.0], "protocols": results, "crf_input_miou": crf,
              "load_average": os.getloadavg()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
