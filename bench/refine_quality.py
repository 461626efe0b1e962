"""Does refinement help? Pseudo-label mIoU of each refinement method against the CAM argmax, on a CAM store.

Methods scored on every image of a split with masks (predicted 255 counts as background, as the stage's
evaluation does):

* ``none``: argmax of K + 0.3 P with the stored background channel (the reference's rule), and with the best
  constant background threshold of a small sweep (the ``bg_threshold`` option);
* ``crf``: the dense CRF on those label maps (stored background, and the best threshold of the sweep;
  reference CRF parameters, gt_prob 0.7);
* ``irn``: the random walk with double_power true (the reference) and false, and with 2**6 instead of 2**8
  steps, on stand-in boundary maps, since no IRN is trained here: ``gt-hard`` (ground-truth class boundaries,
  max-pooled to stride 4: every cell touching a boundary is 1, what a perfect IRN gives), ``gt-soft`` (the same,
  average-pooled: boundary cells get 0.1-0.45, a weak IRN) and ``image`` (the colour gradient of the image,
  max-pooled to stride 4, divided by its maximum: texture-sensitive).

    python bench/refine_quality.py                         # fake CAMs from GT masks on a generated synthetic set
    python bench/refine_quality.py --store runs/x/infer_cams/cams.zarr --split runs/x/prepare_data/val.json  # real CAMs

Results in bench/results/refine_quality-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cam_eval import DEFAULT_THRESHOLDS  # noqa: E402
from models.metrics import ConfusionMatrix  # noqa: E402
from models.pseudo_labels import RandomWalkParams, cam_labels, crf_labels, edge_size, random_walk_labels  # noqa: E402
from storage.cam_store import CamStore  # noqa: E402
from storage.datasets.split_files import load_split_file, save_split  # noqa: E402
from storage.datasets.synthetic import generate_synthetic  # noqa: E402
from storage.datasets.voc_layout import VOCLayoutDataset  # noqa: E402
from storage.images import read_mask, read_rgb  # noqa: E402
from tests.fake_cams import fake_cam_store  # noqa: E402

EDGES = ("gt-hard", "gt-soft", "image")
WALKS = {"double": RandomWalkParams(), "single": RandomWalkParams(double_power=False),
         "double-64steps": RandomWalkParams(exp_times=6)}


def stride4(boundary: torch.Tensor, pool=F.max_pool2d) -> torch.Tensor:
    """(H, W) -> ((H-1)//4+1, (W-1)//4+1) by 4x4 pooling."""
    return pool(boundary[None, None], 4, 4, ceil_mode=True)[0, 0]


def gt_edges(mask: np.ndarray, pool) -> torch.Tensor:
    labels = torch.from_numpy(mask.astype(np.int64))
    boundary = torch.zeros(labels.shape)
    boundary[:, 1:] = (labels[:, 1:] != labels[:, :-1]).float()
    boundary[1:] = torch.maximum(boundary[1:], (labels[1:] != labels[:-1]).float())
    return stride4(boundary, pool)


def image_edges(image: np.ndarray) -> torch.Tensor:
    rgb = torch.from_numpy(image.astype(np.float32))
    grad = torch.zeros(rgb.shape[:2])
    grad[:, 1:] = (rgb[:, 1:] - rgb[:, :-1]).abs().amax(-1)
    grad[1:] = torch.maximum(grad[1:], (rgb[1:] - rgb[:-1]).abs().amax(-1))
    edge = stride4(grad)
    return edge / edge.max().clamp_min(1e-6)


def fake_inputs(folder: Path, images: int) -> tuple[str, str]:
    generate_synthetic(str(folder / "data"), num_images=images, seed=2, min_size=96, max_size=128)
    split = VOCLayoutDataset(str(folder / "data"), "synthetic").load_split("train_aug")
    split_url = str(folder / "train_aug.json")
    save_split(split_url, split)
    fake_cam_store(str(folder / "cams.zarr"), split)
    return str(folder / "cams.zarr"), split_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store")
    parser.add_argument("--split")
    parser.add_argument("--images", type=int, default=120, help="synthetic images when no --store is given")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store_url, split_url = (args.store, args.split) if args.store else fake_inputs(Path(tmp), args.images)
        split = load_split_file(split_url)
        store = CamStore.open(store_url)
        names = split.class_names
        sweep = {t: ConfusionMatrix(len(names)) for t in DEFAULT_THRESHOLDS}
        for image_id in split.ids:
            keys, proto_cam, cam = store.load(image_id)
            mask = read_mask(split.mask_url(image_id))
            for t, matrix in sweep.items():
                matrix.update(mask, cam_labels(keys, proto_cam, cam, bg_threshold=t))
        best = max(DEFAULT_THRESHOLDS, key=lambda t: sweep[t].scores(names)["miou"])
        methods = ["none", f"none@{best}", "crf", f"crf@{best}",
                   *(f"irn/{e}/{v}" for e in EDGES for v in WALKS)]
        matrices = {m: ConfusionMatrix(len(names)) for m in methods}
        seconds = {m: 0.0 for m in ("none", "crf", "irn")}
        for image_id in split.ids:
            keys, proto_cam, cam = store.load(image_id)
            mask, image = read_mask(split.mask_url(image_id)), read_rgb(split.image_url(image_id))
            started = time.perf_counter()
            matrices["none"].update(mask, cam_labels(keys, proto_cam, cam))
            seconds["none"] += time.perf_counter() - started
            matrices[f"none@{best}"].update(mask, cam_labels(keys, proto_cam, cam, bg_threshold=best))
            started = time.perf_counter()
            matrices["crf"].update(mask, crf_labels(image, keys, proto_cam, cam))
            seconds["crf"] += time.perf_counter() - started
            matrices[f"crf@{best}"].update(mask, crf_labels(image, keys, proto_cam, cam, bg_threshold=best))
            edges = {"gt-hard": gt_edges(mask, F.max_pool2d), "gt-soft": gt_edges(mask, F.avg_pool2d),
                     "image": image_edges(image)}
            for source, edge in edges.items():
                assert tuple(edge.shape) == edge_size(*mask.shape)
                for variant, params in WALKS.items():
                    started = time.perf_counter()
                    labels = random_walk_labels(keys, torch.from_numpy(proto_cam), torch.from_numpy(cam), edge,
                                                params)
                    seconds["irn"] += time.perf_counter() - started
                    matrices[f"irn/{source}/{variant}"].update(mask, labels)
    miou = {m: matrix.scores(names)["miou"] for m, matrix in matrices.items()}
    summary = {"none (stored background)": miou["none"], f"none (threshold {best})": miou[f"none@{best}"],
               "crf (stored background)": miou["crf"], f"crf (threshold {best})": miou[f"crf@{best}"],
               **{m: v for m, v in miou.items() if m.startswith("irn")}}
    name = args.name or ("fake-synthetic" if not args.store else Path(args.store).parent.name)
    results = {"store": args.store or f"fake CAMs from GT masks, {args.images} synthetic images (train_aug part)",
               "split": split.name, "images": len(split.ids), "miou": summary,
               "seconds_per_image": {m: s / len(split.ids) / (len(EDGES) * len(WALKS) if m == "irn" else 1)
                                     for m, s in seconds.items()},
               "per_class_iou": {m: {c: s["iou"] for c, s in matrices[m].scores(names)["per_class"].items()}
                                 for m in ("none", "crf", "irn/gt-hard/double", "irn/image/double")}}
    out = ROOT / "bench" / "results" / f"refine_quality-{name}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "per_class_iou"}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
