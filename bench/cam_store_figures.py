"""Do the CAM store's rounded mantissas change the demo's figures? Scores a run's stored CAMs as written (plain
float16) and re-rounded to fewer mantissa bits (storage.cam_store.round_mantissa), on every image of its train
split: the CAM seeds (K, constant background swept over the thresholds of tasks.eval_cam) and the demo's pseudo
labels (dense CRF on K with the stored background). Two processes.

    python bench/cam_store_figures.py runs/synthetic-demo --bits 8     # results in bench/results/

The run must have been written with 10 mantissa bits (``infer_cams.mantissa_bits=10``) for the comparison to
start from plain float16.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cam_eval import DEFAULT_THRESHOLDS  # noqa: E402
from models.metrics import ConfusionMatrix  # noqa: E402
from models.pseudo_labels import cam_labels, crf_labels  # noqa: E402
from storage.cam_store import FLOAT16_MANTISSA_BITS, round_mantissa  # noqa: E402
from storage.datasets.split_files import load_split_file  # noqa: E402
from storage.images import read_mask  # noqa: E402
from tasks.engine.label_maps import load_image_and_cams  # noqa: E402


def score_image(item: tuple[str, str, str], store_url: str, bits: int) -> tuple[np.ndarray, dict]:
    """(mask, labels by (bits, method)) of one (image id, image URL, mask URL)."""
    image_id, image_url, mask_url = item
    image, keys, proto_cam, cam = load_image_and_cams(store_url, image_id, image_url)
    labels = {}
    for kept in (FLOAT16_MANTISSA_BITS, bits):
        p, k = (round_mantissa(a.astype(np.float16), kept).astype(np.float32) for a in (proto_cam, cam))
        for threshold in DEFAULT_THRESHOLDS:
            labels[kept, f"cam_k@{threshold}"] = cam_labels(keys, p, k, 0.0, threshold)
        labels[kept, "crf"] = crf_labels(image, keys, p, k, 0.0)
    return read_mask(mask_url), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished demo run directory")
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args()
    split = load_split_file(f"{args.run}/prepare_data/train_aug.json")
    matrices: dict = {}
    with Pool(2) as pool:
        items = [(i, split.image_url(i), split.mask_url(i)) for i in split.ids]
        job = partial(score_image, store_url=f"{args.run}/infer_cams/cams.zarr", bits=args.bits)
        for mask, labels in pool.imap(job, items, chunksize=8):
            for key, label in labels.items():
                matrices.setdefault(key, ConfusionMatrix(len(split.class_names))).update(mask, label)
    miou = {f"{bits}-bit {name}": 100 * m.scores(split.class_names)["miou"] for (bits, name), m in matrices.items()}
    summary = {}
    for bits in (FLOAT16_MANTISSA_BITS, args.bits):
        best = max((name for name in miou if name.startswith(f"{bits}-bit cam_k@")), key=miou.__getitem__)
        summary[f"{bits}-bit"] = {"cam_seeds_best": miou[best], "best": best,
                                  "pseudo_labels_crf": miou[f"{bits}-bit crf"]}
    names = [name for bits, name in matrices if bits == FLOAT16_MANTISSA_BITS]
    summary["max_abs_difference"] = max(abs(miou[f"{FLOAT16_MANTISSA_BITS}-bit {n}"] - miou[f"{args.bits}-bit {n}"])
                                        for n in names)
    out = ROOT / "bench" / "results" / f"cam_store_figures-{Path(args.run).name}-{args.bits}bit.json"
    out.write_text(json.dumps({"run": args.run, "images": len(split.ids), "summary": summary, "miou": miou},
                              indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
